"""What a run tells its loggers (W&B above all), and how a resumed run stays one run.

- One step axis: everything is logged at the trainer's global step, the number of optimizer steps
  done (GPTModule logs it as Lightning's `step` metric; tables and images pass it too), and the W&B
  logger makes that W&B's own step. So nothing is dropped for arriving "late", the final step's
  table and curve are in the history, and a resumed run's steps continue where its checkpoint was.
- One record: RunRecord logs the resolved config once, at the start of training, with what the run
  really used filled in (vocabulary, parameters, world size, global batch, precision, the peak
  FLOP/s behind perf/mfu), keeps the best val/loss (and its step) in the W&B summary beside the
  last, and carries the W&B run's identity and the list of attempts in every checkpoint.
- One run across resumes: a resume takes the W&B id, name and group from its checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from streamgpt.config import WANDB_LOGGER

log = logging.getLogger("streamgpt")

# Overrides that say where or how a run happens, not what it is: never part of its name.
NOT_IN_NAME = ("resume", "ckpt_path", "paths", "logger", "hydra", "data.stream.url", "tags")
NOT_IN_NAME += ("trainer.devices", "trainer.num_nodes", "trainer.progress_bar", "hparams_search")
NAME_LENGTH = 80


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, with W&B's own step = the trainer's global step.

    `mode` (online/offline) goes to wandb.init directly rather than through Lightning's `offline`
    flag, which refuses log_model offline although W&B keeps offline artifacts and uploads them
    with `wandb sync`.
    """

    def __init__(self, *, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)  # W&B warns that the setting no longer exists
        self._wandb_init["mode"] = mode

    @property
    def identity(self) -> dict[str, Any]:
        """What a resume needs to continue this W&B run."""
        return {
            "id": self.version,
            "name": self._wandb_init.get("name"),
            "group": self._wandb_init.get("group"),
        }

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        run = self.experiment
        if step is None:
            run.log(dict(metrics))
            return
        if step < run.step:
            # Steps an earlier attempt logged after its last checkpoint (it was killed, and these
            # steps are being trained again): W&B keeps the first attempt's rows.
            return
        run.log({**metrics, "trainer/global_step": step}, step=step)

    @rank_zero_only
    def update_summary(self, values: dict[str, Any]) -> None:
        self.experiment.summary.update(values)


# -- names ------------------------------------------------------------------------------------


def _compact(value: str) -> str:
    """Long floats (a sweep's 0.0012345678) in three significant digits."""
    if re.fullmatch(r"-?\d*\.\d{4,}(e-?\d+)?", value):
        return f"{float(value):.3g}"
    return value


def run_names(hydra: Any | None = None) -> tuple[str, str]:
    """(W&B group, run name) from the Hydra job: 'babygpt bf16-mixed lr=3e-4', grouped by
    experiment (or model), and by sweep for the jobs of a multirun."""
    if hydra is None:
        if not HydraConfig.initialized():  # called outside a Hydra app (tests, notebooks)
            return "default", "default"
        hydra = HydraConfig.get()
    choices = hydra.runtime.choices
    base = choices.get("experiment") or choices.get("model") or "run"
    parts = [base]
    for override in hydra.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(NOT_IN_NAME) or value == base:
            continue
        if key == "debug":
            parts.append("debug")
        elif key in choices:  # a config group: its option says it (bf16-mixed, lion, files)
            parts.append(value)
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={_compact(value)}")
    name = " ".join(parts)
    if len(name) > NAME_LENGTH:
        name = name[: NAME_LENGTH - 1] + "…"
    group_name = base
    if hydra.mode == RunMode.MULTIRUN:
        group_name = f"{base}/sweep-{Path(hydra.sweep.dir).name}"
    return group_name, name


# -- building ---------------------------------------------------------------------------------


def checkpoint_identity(checkpoint: str | None) -> dict[str, Any]:
    """The W&B run a checkpoint belongs to ({} when it has none)."""
    if checkpoint is None:
        return {}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    identity = state.get("wandb") or {}
    if not identity and state.get("wandb_run_id"):  # checkpoints written before names were kept
        identity = {"id": state["wandb_run_id"]}
    return identity


def build_loggers(cfg: DictConfig, identity: dict[str, Any]) -> list:
    """The run's loggers, one per entry of `cfg.logger` (Hydra `_target_`s: wandb, csv,
    tensorboard, or any Lightning logger); `identity` (from the checkpoint) makes a resume the
    same W&B run."""
    loggers = []
    for key, conf in cfg.logger.items():
        if conf._target_ == WANDB_LOGGER:  # this module's WandbLogger
            loggers.append(_wandb(conf, identity))
            continue
        logger = instantiate(conf)
        if not isinstance(logger, Logger):
            raise ValueError(
                f"logger.{key}: {conf._target_} is not a Lightning logger "
                "(lightning.pytorch.loggers.Logger); see conf/logger/ for examples"
            )
        loggers.append(logger)
    return loggers


def _wandb(conf: DictConfig, identity: dict[str, Any]) -> WandbLogger:
    """Our WandbLogger: online when WANDB_API_KEY is set (mode=auto), named after the run."""
    mode = conf.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    group, name = run_names()
    return instantiate(
        conf,
        mode=mode,
        name=identity.get("name") or name,
        group=identity.get("group") or group,
        tags=list(conf.tags),
        id=identity.get("id"),
    )


# -- the record -------------------------------------------------------------------------------


class RunRecord(L.Callback):
    """The run's config (logged once, with what the run really used), its best val/loss, its
    attempts and its W&B identity (kept in every checkpoint, so a resume continues all of them).

    `config`: the resolved run config; `facts`: what is known before training (the peak FLOP/s
    behind perf/mfu and where it comes from, the tokenizer's vocabulary); `overrides`: this
    attempt's command-line overrides.
    """

    def __init__(self, config: dict[str, Any], facts: dict[str, Any], overrides: list[str]):
        self.config = config
        self.facts = facts
        self.overrides = list(overrides)
        self.attempts: list[dict[str, Any]] = []
        self.best: tuple[float, int] | None = None  # (val/loss, step)

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        config = copy.deepcopy(self.config)
        gpt = pl_module.gpt
        config["model"] = {**config.get("model", {}), **pl_module.hparams.model}
        stream = config.get("data", {}).get("stream", {})
        batch = stream.get("batch_size", 0) * trainer.world_size
        batch *= trainer.accumulate_grad_batches
        config["run"] = {
            **self.facts,
            "params": gpt.num_params(),
            "flops_per_token": gpt.flops_per_token(),
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "devices_per_node": trainer.num_devices,
            "global_batch": batch,
            "tokens_per_step": batch * stream.get("max_length", 0),
            "precision": str(trainer.precision),
            "attempts": self.attempts,
        }
        return config

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.attempts.append(
            {
                "attempt": len(self.attempts) + 1,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "resumed_from_step": trainer.global_step or None,
                "overrides": self.overrides,
            }
        )
        record = self.record(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(record)
        self._summarize(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or loss is None:
            return
        if self.best is None or float(loss) < self.best[0]:
            self.best = (float(loss), trainer.global_step)
            self._summarize(trainer)

    def _summarize(self, trainer: L.Trainer) -> None:
        if self.best is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.update_summary(
                    {"val/loss_best": self.best[0], "val/loss_best_step": self.best[1]}
                )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb"] = logger.identity

    def state_dict(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attempts = list(state.get("attempts", []))
        best = state.get("best")
        self.best = (float(best[0]), int(best[1])) if best else None
