"""Typed schema of the eval config (`conf/eval.yaml`), in Hydra's ConfigStore, and `validate`:
every value checked once, one line per refusal naming the key and what it accepts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from streamgpt import command_line
from streamgpt.command_line import register_help
from streamgpt.config import PRECISIONS, PathsConfig
from streamgpt.config import _logger as validate_logger
from streamgpt.server.config import CONF as SERVER_CONF
from streamgpt.server.config import require

CHECKPOINTS = ("last", "best")
SPLITS = ("train", "validation")


@dataclass
class EvalDataConfig:
    # Nothing set: the run's held-out split (its validation.jsonl, as training validated on it).
    files: list[str] | None = None  # folders, files or globs of .txt/.jsonl/.parquet
    url: str | None = None  # or a stream server's ws:// URL: one whole epoch of `split`
    split: str = "train"  # the stream's split: train (one epoch) or validation
    text_field: str = "text"  # as the files source: the .jsonl field / .parquet column
    id_field: str | None = None
    min_words: int = 1  # documents with fewer words are skipped, as the files source does
    eot_marker: str = "<|endoftext|>"  # what ends a document in the run's samples
    token_env: str = "STREAMGPT_TOKEN"  # variable holding the server's bearer token, if any
    samples_per_request: int = 64
    timeout_s: float = 60.0


@dataclass
class EvalTrainerConfig:
    # null: the run's trainer.precision; or the precision group, as train.py: precision=bf16-mixed
    precision: str | None = None


@dataclass
class EvalConfig:
    ckpt_path: str = MISSING  # a .ckpt, or a run folder (its checkpoints/)
    checkpoint: str = "last"  # which of a run folder's: last (last.ckpt) or best (by val/loss)
    tokenizer_path: str | None = None  # null: the run's tokenizer.json
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    batch_size: int | None = None  # sequences per forward pass; null: the run's
    max_length: int | None = None  # tokens per sequence; null: the run's
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda | cuda:1 ...
    trainer: EvalTrainerConfig = field(default_factory=EvalTrainerConfig)
    # The logger group of training (conf/logger/): only its W&B entry is used, for the eval run.
    logger: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)  # the eval run's W&B tags
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: str = "eval"


EVAL_USAGE = """python eval.py ckpt_path=<checkpoint or run folder> [key=value ...]: evaluate.
  Loss, perplexity and bits per byte on the run's held-out split (default), on files
  (data.files=[a.txt,corpus/]) or on one epoch of a stream (data.url=ws://host:port/ws).
  Writes eval.json beside the checkpoint. Exit codes: 0 done; 2 a config or data error; 1 other."""


def register_configs(conf_dir: Path) -> None:
    """The schema, `--help` and the resolvers of the eval config (conf_dir: the conf/ folder)."""
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    register_help([conf_dir], "eval", EVAL_USAGE, "data.files=[notes.txt] logger=none")
    root = str(Path(conf_dir).resolve().parent)
    OmegaConf.register_new_resolver("streamgpt.root", lambda: root, replace=True)


def check_command_line(conf_dir: Path, argv: list[str]) -> None:
    """A misspelt key or group option on eval.py's command line: one line, exit 2."""
    command_line.check_command_line([conf_dir, SERVER_CONF], "eval", EvalConfig, {}, argv)


def validate(cfg: Any) -> None:
    """Refuse contradictory or impossible settings before anything is read, one line each."""
    require(cfg.checkpoint in CHECKPOINTS, "checkpoint", "last or best", cfg.checkpoint)
    data = cfg.data
    if data.files is not None and data.url is not None:
        raise ValueError("data.files and data.url both say what to evaluate; give only one")
    if data.files is not None:
        require(len(data.files) > 0, "data.files", "a non-empty list of paths", data.files)
    url = data.url
    require(url is None or str(url).startswith(("ws://", "wss://")), "data.url", "a ws:// URL", url)
    require(data.split in SPLITS, "data.split", "train or validation", data.split)
    require(data.min_words >= 1, "data.min_words", ">= 1", data.min_words)
    require(
        data.samples_per_request >= 1, "data.samples_per_request", ">= 1", data.samples_per_request
    )
    require(data.timeout_s > 0, "data.timeout_s", "positive", data.timeout_s)
    for key in ("batch_size", "max_length"):
        value = cfg[key]
        require(value is None or value >= 1, key, "a positive integer or null", value)
    validate_logger(cfg.logger)
    precision = cfg.trainer.precision
    require(
        precision is None or precision in PRECISIONS,
        "trainer.precision",
        f"null (the run's) or one of {list(PRECISIONS)}",
        precision,
    )
