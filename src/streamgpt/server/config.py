"""Typed schemas of the server's config (this package's conf/serve.yaml and conf/source/*.yaml).

Registered in Hydra's ConfigStore, so a misspelt key or a value of the wrong type fails when the
config is composed, naming the key.
"""

from __future__ import annotations

import math
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from streamgpt.server.sources import SOURCES
from streamgpt.server.sources.files import find_files

# A mixture's component names: they prefix sample ids (`plays/henry_v#3`).
NAME = re.compile(r"[A-Za-z0-9_.-]+")

# The server's yaml config, shipped in the package (train.yaml finds source/ here too).
CONF = Path(__file__).resolve().parent / "conf"


@dataclass
class SourceConfig:
    name: str = MISSING
    # Held-out documents: an exact count, or a fraction of the documents (count wins if both).
    validation_docs: int | None = None
    validation_fraction: float | None = None
    # Documents with fewer words are skipped (EIR's reference server skips FineWeb pages under 20).
    min_words: int = 1


@dataclass
class ShakespeareSourceConfig(SourceConfig):
    name: str = "shakespeare"
    validation_docs: int | None = 4


@dataclass
class FilesSourceConfig(SourceConfig):
    name: str = "files"
    # Folders (searched recursively), files or globs of .txt, .jsonl and .parquet.
    paths: list[str] = MISSING
    text_field: str = "text"
    # A field/column holding a unique document id; null keys documents by file and line/row.
    id_field: str | None = None
    validation_fraction: float | None = 0.01


@dataclass
class FineWebSourceConfig(SourceConfig):
    name: str = "fineweb"
    path: str = "HuggingFaceFW/fineweb"
    config_name: str | None = "sample-10BT"
    revision: str | None = None
    # Local files instead of the hub: path=parquet data_files=[...] (FineWeb's own columns).
    data_files: list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    id_field: str | None = "id"
    min_words: int = 20
    validation_fraction: float | None = 0.01
    shuffle_window: int = 1024
    # Units dealt to consumers: whole data files, or parquet row groups (many more units).
    shard_by: str = "file"


@dataclass
class MixComponentConfig:
    # A source config of its own, as in source/<name>.yaml: {name: shakespeare|files|fineweb, ...}.
    source: Any = MISSING
    # Share of the samples, relative to the other components' weights (they need not sum to 1).
    weight: float = MISSING


@dataclass
class MixStageConfig:
    # From this position of every stream on (counted from its start), these weights; or from
    # this global training step on (the trainer's client asks for the stage in its handshake).
    # One of the two, the same one in every stage.
    from_sample: int | None = None
    from_step: int | None = None
    weights: dict[str, float] = MISSING


@dataclass
class MixSourceConfig:
    name: str = "mix"
    # {name: MixComponentConfig}, [MixStageConfig]. Free-form here so that Hydra can add entries
    # (+source.components.notes={...}); mix_config() types each one when the config is checked.
    components: dict[str, Any] = field(default_factory=dict)
    stages: list[Any] = field(default_factory=list)


@dataclass
class ChunkConfig:
    words: int = 512
    eot_marker: str = "<|endoftext|>"
    whitespace: str = "preserve"


@dataclass
class EndConfig:
    # null: endless. Consumers end after epoch max_epochs-1; the shared (core) stream after
    # max_epochs complete passes. max_samples is split across a run's consumers.
    max_epochs: int | None = None
    max_samples: int | None = None


@dataclass
class LimitsConfig:
    max_frame_bytes: int = 4 << 20
    max_batch_size: int = 4096
    max_connections: int = 256
    # EIR's client does not answer pings while it validates or samples, so a peer is judged by
    # its messages: one silent this long is dropped. EIR's reference server allows 3600 s.
    idle_timeout_s: float = 3600.0
    # setValidationIds accumulates (see app.py); this bounds the memory it can take.
    max_validation_ids: int = 1_000_000
    # putTokenizer (tokens on the wire): the largest tokenizer.json accepted, in UTF-8 bytes.
    max_tokenizer_bytes: int = 4 << 20


@dataclass
class TokensConfig:
    # Tokens on the wire (server/token_cache.py): keep the token ids of indexed corpora (and the
    # uploaded tokenizers) on disk, so a corpus is tokenized once per tokenizer, not every epoch.
    cache: bool = True
    # null: $STREAMGPT_CACHE/tokens (streamgpt.cache.cache_dir()); servers may share one.
    cache_dir: str | None = None
    # After a build, the least recently used entries this server is not using are deleted until
    # the rest fit.
    cache_max_bytes: int = 20 << 30


@dataclass
class AuthConfig:
    # Name of the environment variable holding the bearer token (never the token itself, so it
    # stays out of saved configs and logs). Unset or empty variable: no auth.
    token_env: str | None = "STREAMGPT_TOKEN"
    # Allowed Origin headers (browsers send one; other clients do not, and are always allowed).
    origins: list[str] | None = None


@dataclass
class ServeConfig:
    source: Any = MISSING
    host: str = "127.0.0.1"
    port: int = 8000
    # Server processes on the port (workers.py); each loads the corpus and has its own limits.
    workers: int = 1
    path: str = "/ws"
    # Shuffle seed of the shared stream that core-protocol clients (EIR) read.
    seed: int = 0
    output_name: str = "text_output"
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    end: EndConfig = field(default_factory=EndConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    log_every_s: float = 30.0
    # Per-message deflate: off by default (it cut throughput ~5x here, and lets a small frame
    # inflate into a huge one).
    compression: bool = False


SOURCE_SCHEMAS = {
    "shakespeare": ShakespeareSourceConfig,
    "files": FilesSourceConfig,
    "fineweb": FineWebSourceConfig,
    "mix": MixSourceConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(group="source", name="shakespeare_schema", node=ShakespeareSourceConfig)
    cs.store(group="source", name="files_schema", node=FilesSourceConfig)
    cs.store(group="source", name="fineweb_schema", node=FineWebSourceConfig)
    cs.store(group="source", name="mix_schema", node=MixSourceConfig)


def require(ok: bool, key: str, accepted: str, value: Any) -> None:
    """Refuse one config value in one line: the key, what it accepts, what it got."""
    if not ok:
        raise ValueError(f"{key} must be {accepted}, got {value!r}")


def _positive_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and value > 0)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check a composed `serve` config without loading any data: a bad value fails in one line.

    `prefix` names the keys as the user wrote them (`server.` inside the training config).
    """
    source = cfg.source
    key = f"{prefix}source"
    require(source.name in SOURCES, f"{key}.name", f"one of {list(SOURCES)}", source.name)
    if source.name == "mix":
        for name, part in mix_config(source, key)[0].items():
            _validate_source(part.source, f"{key}.components.{name}.source")
    else:
        _validate_source(source, key)
    require(cfg.chunk.words >= 1, f"{prefix}chunk.words", "a positive integer", cfg.chunk.words)
    space = cfg.chunk.whitespace
    require(
        space in ("preserve", "collapse"),
        f"{prefix}chunk.whitespace",
        "preserve or collapse",
        space,
    )
    for name, value in cfg.end.items():
        require(
            _positive_or_null(value), f"{prefix}end.{name}", "a positive integer or null", value
        )
    for name, value in cfg.limits.items():
        require(value > 0, f"{prefix}limits.{name}", "positive", value)
    size = cfg.tokens.cache_max_bytes
    require(size > 0, f"{prefix}tokens.cache_max_bytes", "a positive number of bytes", size)
    require(0 <= cfg.port <= 65535, f"{prefix}port", "in [0, 65535] (0: a free port)", cfg.port)
    _validate_workers(cfg.workers, f"{prefix}workers")
    require(cfg.path.startswith("/"), f"{prefix}path", "a path starting with '/'", cfg.path)
    require(cfg.log_every_s > 0, f"{prefix}log_every_s", "positive", cfg.log_every_s)


def _validate_workers(workers: Any, key: str) -> None:
    require(isinstance(workers, int) and workers >= 1, key, "a positive integer", workers)
    # Elsewhere SO_REUSEPORT is missing, or (BSD, macOS) gives every connection to one socket.
    linux = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
    require(
        workers == 1 or linux,
        key,
        f"1 on {sys.platform} (several processes share a port only on Linux, with SO_REUSEPORT)",
        workers,
    )


def _validate_source(source: Any, key: str) -> None:
    """One source's own keys (a single source, or a component of a mixture)."""
    if source.validation_docs is not None:
        require(
            source.validation_docs >= 0, f"{key}.validation_docs", ">= 0", source.validation_docs
        )
        require(
            source.name != "fineweb",
            f"{key}.validation_docs",
            "null for fineweb (it cannot count documents without reading them all; "
            "use validation_fraction)",
            source.validation_docs,
        )
    fraction = source.validation_fraction
    require(
        fraction is None or 0 <= fraction < 1, f"{key}.validation_fraction", "in [0, 1)", fraction
    )
    require(source.min_words >= 0, f"{key}.min_words", ">= 0", source.min_words)
    if source.name == "files":
        find_files(list(source.paths))  # names the path that matches nothing
    if source.name == "fineweb":
        shard = source.shard_by
        require(shard in ("file", "row_group"), f"{key}.shard_by", "'file' or 'row_group'", shard)
        require(source.shuffle_window >= 1, f"{key}.shuffle_window", ">= 1", source.shuffle_window)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def typed(schema: type, node: Any, where: str) -> Any:
    """`node` on top of `schema`'s defaults; a misspelt key or a wrong type fails in one line."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]
        at = f"{where}.{e.full_key}" if e.full_key else where
        raise ValueError(f"{at}: {first}") from None


def mix_config(mix: Any, key: str = "source") -> tuple[dict[str, Any], list[Any]]:
    """A mixture's components and stages, typed and checked: each component's source typed by
    that source's schema (its defaults filled in), names usable as id prefixes, weights positive,
    stages in order and weighting every component."""
    require(len(mix.components) > 0, f"{key}.components", "at least one component", {})
    components = {}
    for name, node in mix.components.items():
        where = f"{key}.components.{name}"
        require(
            NAME.fullmatch(str(name)) is not None,
            f"{key}.components",
            "named by letters, digits, '_', '-' or '.' (the name prefixes sample ids: name/id)",
            name,
        )
        part = typed(MixComponentConfig, node, where)
        weight = None if OmegaConf.is_missing(part, "weight") else part.weight
        require(_positive(weight), f"{where}.weight", "a positive number", weight)
        source = None if OmegaConf.is_missing(part, "source") else part.source
        kind = source.get("name") if OmegaConf.is_dict(source) else None
        require(
            kind in SOURCES and kind != "mix",
            f"{where}.source.name",
            f"one of {[s for s in SOURCES if s != 'mix']} (a mixture is not a component)",
            kind,
        )
        part.source = typed(SOURCE_SCHEMAS[kind], part.source, f"{where}.source")
        components[name] = part
    stages = [
        typed(MixStageConfig, node, f"{key}.stages[{i}]") for i, node in enumerate(mix.stages)
    ]
    _check_stages(stages, list(components), key)
    return components, stages


def _check_stages(stages: list[Any], names: list[str], key: str) -> None:
    previous = 0
    by = None  # "from_sample" or "from_step": the first stage's, then every stage's
    for i, stage in enumerate(stages):
        where = f"{key}.stages[{i}]"
        require(not OmegaConf.is_missing(stage, "weights"), f"{where}.weights", "given", "???")
        starts = {k: stage[k] for k in ("from_sample", "from_step") if stage[k] is not None}
        require(len(starts) == 1, where, "given exactly one of from_sample and from_step", starts)
        by = by or next(iter(starts))
        require(
            by in starts,
            where,
            f"given {by} like stages[0] (stages start all from a sample or all from a step)",
            starts,
        )
        start, unit = stage[by], by.removeprefix("from_")
        require(
            start > previous,
            f"{where}.{by}",
            f"greater than {previous} (stages start after {unit} 0, in order)",
            start,
        )
        previous = start
        given = list(stage.weights)
        require(
            sorted(given) == sorted(names),
            f"{where}.weights",
            f"a weight for each component, {names}",
            given,
        )
        for name, weight in stage.weights.items():
            require(_positive(weight), f"{where}.weights.{name}", "a positive number", weight)
