"""Typed schemas of the training config (`conf/train.yaml` and its groups), in Hydra's ConfigStore.

A misspelt key or a value of the wrong type fails when the config is composed, naming the key.
Checks that need several keys at once (a context longer than the position table, resume=auto
with a ckpt_path, ...) are in `validate`, run before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from streamgpt.data.config import StreamConfig, TokenizerConfig
from streamgpt.model import GPTConfig
from streamgpt.optim import OptimizerConfig
from streamgpt.perf import PRECISIONS
from streamgpt.server.config import ServeConfig
from streamgpt.server.config import register_configs as register_server_configs


@dataclass
class ModelConfig(GPTConfig):
    vocab_size: int | None = None  # null: the run's tokenizer, rounded up to a multiple of 64
    compile: bool = False

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
    max_steps: int = 400
    val_every: int = 100  # validation every this many steps
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    progress_bar: bool = True
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


@dataclass
class LoggerConfig:
    kind: str = "wandb"  # wandb | csv | none
    project: str = "streamgpt"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline


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
    # The embedded stream server, started when data.stream.url is null (conf/serve.yaml's keys).
    server: ServeConfig = field(default_factory=ServeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: str = "train"
    seed: int = 0
    resume: str | None = None  # auto: continue from the newest intact checkpoint of the run folder
    ckpt_path: str | None = None  # continue from this checkpoint
    peak_flops: float | None = None  # per device, for perf/mfu; null: measured at start
    optimized_metric: str = "val/loss"  # what train.py returns (hyperparameter search)


def register_configs() -> None:
    register_server_configs()
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: Any) -> None:
    """Refuse contradictory or impossible settings before anything starts, one line each."""
    model = {k: v for k, v in cfg.model.items() if k != "compile"}
    GPTConfig(**{**model, "vocab_size": model["vocab_size"] or 64})  # heads, choices, ranges
    OptimizerConfig(**cfg.optimizer)
    if cfg.trainer.precision not in PRECISIONS:
        raise ValueError(
            f"trainer.precision must be one of {list(PRECISIONS)}, got {cfg.trainer.precision!r}"
        )
    stream = cfg.data.stream
    if stream.max_length > cfg.model.context:
        raise ValueError(
            f"data.stream.max_length={stream.max_length} exceeds model.context={cfg.model.context} "
            "(the position table); lower it or raise model.context"
        )
    for key, value in (
        ("data.stream.batch_size", stream.batch_size),
        ("data.stream.max_length", stream.max_length),
        ("trainer.max_steps", cfg.trainer.max_steps),
        ("trainer.val_every", cfg.trainer.val_every),
    ):
        if value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value}")
    if cfg.resume not in (None, "auto"):
        raise ValueError(f"resume must be 'auto' or null, got {cfg.resume!r}")
    if cfg.resume == "auto" and cfg.ckpt_path:
        raise ValueError(
            "resume=auto and ckpt_path both say where to resume from; give only one "
            "(resume=auto picks the newest checkpoint of the run folder)"
        )
    every, val = cfg.callbacks.checkpoint_every, cfg.trainer.val_every
    if stream.valid_size > 0 and every > 0 and every % val:
        raise ValueError(
            f"callbacks.checkpoint_every={every} must be a multiple of trainer.val_every={val}: "
            "checkpoints are ranked by the val/loss of their own step"
        )
    if cfg.logger.kind not in ("wandb", "csv", "none"):
        raise ValueError(f"logger must be wandb, csv or none, got {cfg.logger.kind!r}")
    if cfg.logger.mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.mode must be auto, online or offline, got {cfg.logger.mode!r}")
    if cfg.tokenizer.name == "pretrained" and not cfg.tokenizer.path:
        raise ValueError("tokenizer=pretrained needs tokenizer.path=<tokenizer.json>")
