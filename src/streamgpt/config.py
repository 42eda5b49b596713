"""Typed schemas of the training config (`conf/train.yaml` and its groups), in Hydra's ConfigStore.

A misspelt key or a value of the wrong type fails when the config is composed, naming the key.
Every value is checked once, here, before any work starts (`validate`: one function per group,
one line per refusal naming the key and what it accepts); the code behind trusts the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from streamgpt import budget, command_line
from streamgpt.command_line import register_help
from streamgpt.data import elastic
from streamgpt.data import tokenizer as tokenizers
from streamgpt.data.config import StreamConfig, TokenizerConfig
from streamgpt.hf_init import check_init_from
from streamgpt.linear import cpu_has_native_bf16
from streamgpt.malloc import MODES as MALLOC_MODES
from streamgpt.model import GPTConfig
from streamgpt.optim import OptimizerConfig
from streamgpt.server.config import CONF as SERVER_CONF
from streamgpt.server.config import SOURCE_SCHEMAS, ServeConfig, require
from streamgpt.server.config import register_configs as register_server_configs
from streamgpt.server.config import validate as validate_server
from streamgpt.sweeps import sweep_seed

log = logging.getLogger("streamgpt")


@dataclass
class ModelConfig(GPTConfig):
    vocab_size: int | None = None  # null: the run's tokenizer, rounded up to a multiple of 64
    compile: bool = False
    # A local Hugging Face GPT-2 folder whose weights a fresh run starts from (hf_init.py).
    init_from: str | None = None

    def __post_init__(self) -> None:
        pass  # checked by validate(), once the whole config is known


@dataclass
class DataConfig:
    stream: StreamConfig = field(default_factory=StreamConfig)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"  # set by the precision group: precision=bf16-mixed
    max_steps: int = 400  # an upper bound when budget_s is set
    budget_s: float | None = None  # seconds from the process start (budget.py); null: no limit
    val_every: int = 100  # validation every this many steps
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    progress_bar: bool = True
    malloc: str = "speed"  # speed | memory: glibc keeps freed buffers, or returns those >= 4 MiB
    # null | simple | advanced | pytorch | {_target_: a lightning.pytorch.profilers class, ...}
    profiler: Any = None
    # Any other lightning.Trainer argument, passed through as is.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplesConfig:
    prompts: list[str] = field(default_factory=lambda: ["This movie is the most", "Steven"])
    n_auto: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int = 0


@dataclass
class CallbacksConfig:
    sample_every: int = 100  # generations and the loss curve
    checkpoint_every: int = 100  # a multiple of trainer.val_every when validating
    n_saved: int = 1  # best checkpoints kept by val/loss (plus last.ckpt)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    # Any other Lightning callback, by name: {_target_: <class>, <its arguments>} (Hydra).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # The embedded stream server, started when data.stream.url is null (serve.yaml's keys).
    server: ServeConfig = field(default_factory=ServeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Lightning loggers by name, each {_target_: <class>, <its arguments>} (conf/logger/).
    logger: dict[str, Any] = field(default_factory=dict)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: str = "train"
    seed: int = 0
    resume: str | None = None  # auto: continue from the newest intact checkpoint of the run folder
    ckpt_path: str | None = None  # continue from this checkpoint
    peak_flops: float | None = None  # per device, for perf/mfu; null: measured at start
    optimized_metric: str = "val/loss"  # what train.py returns (hyperparameter search)
    tags: list[str] = field(default_factory=list)  # the W&B run's tags
    print_config: bool = True  # the resolved config as a tree at the start (and in the run folder)


def register_configs(conf_dir: Path) -> None:
    """The schemas, `--help` and the resolvers of the train config (conf_dir: the conf/ folder)."""
    register_server_configs()
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_help(
        [conf_dir, SERVER_CONF], "train", TRAIN_USAGE, "model.d_model=256 optimizer.lr=3e-4"
    )
    root = str(Path(conf_dir).resolve().parent)
    OmegaConf.register_new_resolver("streamgpt.root", lambda: root, replace=True)
    OmegaConf.register_new_resolver("streamgpt.sweep_seed", sweep_seed, replace=True)


TRAIN_USAGE = """python train.py [group=option ...] [key=value ...]: train a GPT on a text stream.
  -m: one job per value (optimizer.lr=1e-3,3e-4); hparams_search=optuna: an Optuna search.
  Exit codes: 0 finished; 2 a config, setup or data error (one line says which); 130 / 143
  stopped by SIGINT / SIGTERM after saving a checkpoint (resume=auto continues it); 1 other."""


def check_command_line(conf_dir: Path, argv: list[str]) -> None:
    """A misspelt key or group option on train.py's command line: one line, exit 2."""
    command_line.check_command_line(
        [conf_dir, SERVER_CONF], "train", TrainConfig, SOURCE_SCHEMAS, argv
    )


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def validate(cfg: Any) -> None:
    """Refuse contradictory or impossible settings before anything starts, one line each."""
    _model(cfg)
    _stream(cfg.data.stream)
    _trainer(cfg.trainer)
    budget.check_config(cfg)
    elastic.check_config(cfg)
    _callbacks(cfg.callbacks, cfg)
    _resume(cfg)
    _logger(cfg.logger)
    _instantiable("callbacks.extra", cfg.callbacks.extra)
    require(
        all(isinstance(tag, str) and tag for tag in cfg.tags), "tags", "a list of words", cfg.tags
    )
    tokenizers.check_config(cfg.tokenizer, cfg.data.stream)
    require(
        cfg.peak_flops is None or cfg.peak_flops > 0,
        "peak_flops",
        "positive or null",
        cfg.peak_flops,
    )
    if cfg.data.stream.url is None:
        validate_server(cfg.server, prefix="server.")


def _positive(values: dict[str, Any]) -> None:
    for key, value in values.items():
        require(value > 0, key, "positive", value)


def _at_least_zero(values: dict[str, Any]) -> None:
    for key, value in values.items():
        require(value >= 0, key, ">= 0 (0 turns it off)", value)


def gpt_fields(model: Any) -> dict[str, Any]:
    """The model group's GPTConfig fields (not compile or init_from, which are the run's)."""
    names = {f.name for f in fields(GPTConfig)}
    return {k: v for k, v in dict(model).items() if k in names}


def _model(cfg: Any) -> None:
    model = gpt_fields(cfg.model)
    GPTConfig(**{**model, "vocab_size": model["vocab_size"] or 64})  # heads, choices, ranges
    if cfg.model.init_from:
        check_init_from(cfg.model)
    OptimizerConfig(**cfg.optimizer)
    if cfg.optimizer.name == "muon" and "fsdp" in str(cfg.trainer.strategy):
        raise ValueError(
            "optimizer=muon orthogonalises each matrix whole and trainer.strategy=fsdp shards "
            "them across ranks: use trainer=ddp (each rank holds whole matrices) or optimizer=adamw"
        )
    if cfg.data.stream.max_length > cfg.model.context:
        raise ValueError(
            f"data.stream.max_length={cfg.data.stream.max_length} exceeds "
            f"model.context={cfg.model.context} (the position table); lower it or raise "
            "model.context"
        )


def _url_ok(url: Any) -> bool:
    urls = [url] if isinstance(url, str) else list(url)
    return bool(urls) and all(
        isinstance(u, str) and u.startswith(("ws://", "wss://")) for u in urls
    )


def _stream(stream: Any) -> None:
    keys = ("batch_size", "max_length", "prefetch_batches", "samples_per_request")
    keys += ("requests_in_flight", "connect_timeout_s", "recv_timeout_s")
    _positive({f"data.stream.{k}": stream[k] for k in keys})
    _positive({"data.stream.retry.backoff_s": stream.retry.backoff_s})
    _at_least_zero(
        {
            "data.stream.valid_size": stream.valid_size,
            "data.stream.num_workers": stream.num_workers,
            "data.stream.overfit_batches": stream.overfit_batches,
            "data.stream.retry.budget_s": stream.retry.budget_s,
        }
    )
    retry = stream.retry
    require(
        retry.max_backoff_s >= retry.backoff_s,
        "data.stream.retry.max_backoff_s",
        f">= data.stream.retry.backoff_s={retry.backoff_s}",
        retry.max_backoff_s,
    )
    if stream.url is not None:
        require(
            _url_ok(stream.url),
            "data.stream.url",
            "a ws:// or wss:// URL, a list of them, or null (the embedded server)",
            stream.url,
        )


def _trainer(trainer: Any) -> None:
    keys = ("max_steps", "val_every", "num_nodes", "log_every_n_steps", "accumulate_grad_batches")
    _positive({f"trainer.{k}": trainer[k] for k in keys})
    accelerator = trainer.accelerator
    require(
        accelerator in ACCELERATORS,
        "trainer.accelerator",
        f"one of {list(ACCELERATORS)}",
        accelerator,
    )
    require(trainer.malloc in MALLOC_MODES, "trainer.malloc", "speed or memory", trainer.malloc)
    determinism = trainer.deterministic
    require(
        determinism in (True, False, "warn"),
        "trainer.deterministic",
        "true, false or warn",
        determinism,
    )
    limit = trainer.limit_val_batches
    require(
        isinstance(limit, int | float)
        and (limit >= 1 if isinstance(limit, int) else 0 <= limit <= 1),
        "trainer.limit_val_batches",
        "a fraction in [0, 1] or a whole number of batches",
        limit,
    )
    _precision(trainer.precision, accelerator)
    profiler = trainer.profiler
    if OmegaConf.is_dict(profiler):
        _instantiable("trainer", {"profiler": profiler})
    else:
        require(
            profiler in (None, "simple", "advanced", "pytorch"),
            "trainer.profiler",
            "null, simple, advanced, pytorch or {_target_: a lightning.pytorch.profilers class}",
            profiler,
        )


def _precision(precision: str, accelerator: str) -> None:
    """A precision Lightning knows and this hardware runs; a slow choice is warned about."""
    require(precision in PRECISIONS, "trainer.precision", f"one of {list(PRECISIONS)}", precision)
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda:
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision={precision}: this GPU has no bfloat16 (compute capability < 8.0); "
                "use precision=16-mixed (or 32-true)"
            )
        return
    if precision.startswith("16"):
        raise ValueError(
            f"precision={precision} needs a GPU (float16 autocast on a CPU is not supported by "
            "Lightning); on a CPU use precision=32-true, or bf16-mixed"
        )
    if precision.startswith("bf16") and not cpu_has_native_bf16():
        log.warning(
            "precision=%s on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it runs, "
            "but matrix products are several times slower than float32 here "
            "(scripts/bench_train.py measures it); precision=32-true is faster on this machine",
            precision,
        )


def _callbacks(calls: Any, cfg: Any) -> None:
    samples = calls.samples
    _positive(
        {
            "callbacks.samples.max_new_tokens": samples.max_new_tokens,
            "callbacks.samples.temperature": samples.temperature,
        }
    )
    keys = ("sample_every", "checkpoint_every", "n_saved")
    _at_least_zero({f"callbacks.{k}": calls[k] for k in keys})
    _at_least_zero({"callbacks.samples.n_auto": samples.n_auto})
    top_k, top_p = samples.top_k, samples.top_p
    require(top_k is None or top_k >= 1, "callbacks.samples.top_k", ">= 1 or null", top_k)
    require(top_p is None or 0 < top_p <= 1, "callbacks.samples.top_p", "in (0, 1] or null", top_p)
    every, val = calls.checkpoint_every, cfg.trainer.val_every
    if cfg.data.stream.valid_size > 0 and every > 0 and every % val:
        raise ValueError(
            f"callbacks.checkpoint_every={every} must be a multiple of trainer.val_every={val}: "
            "checkpoints are ranked by the val/loss of their own step"
        )


def _resume(cfg: Any) -> None:
    require(cfg.resume in (None, "auto"), "resume", "'auto' or null", cfg.resume)
    if cfg.resume == "auto" and cfg.ckpt_path:
        raise ValueError(
            "resume=auto and ckpt_path both say where to resume from; give only one "
            "(resume=auto picks the newest checkpoint of the run folder)"
        )
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ValueError(f"ckpt_path={cfg.ckpt_path}: no such file")


WANDB_LOGGER = "streamgpt.loggers.WandbLogger"


def _instantiable(group: str, entries: Any) -> None:
    """Every entry of a `_target_` mapping (logger, callbacks.extra) names the class to build."""
    for key, entry in entries.items():
        target = entry.get("_target_") if OmegaConf.is_dict(entry) else None
        if not isinstance(target, str) or not target:
            raise ValueError(
                f"{group}.{key} needs a _target_ (the class to build, e.g. "
                f"lightning.pytorch.loggers.CSVLogger) and its arguments; got {entry!r}"
            )


def _logger(loggers: Any) -> None:
    _instantiable("logger", loggers)
    for key, logger in loggers.items():
        if logger._target_ != WANDB_LOGGER:
            continue
        mode, log_model = logger.get("mode", "auto"), logger.get("log_model", False)
        require(
            mode in ("auto", "online", "offline"),
            f"logger.{key}.mode",
            "auto, online or offline",
            mode,
        )
        require(
            log_model in (True, False, "all"),
            f"logger.{key}.log_model",
            "true, false or all",
            log_model,
        )
