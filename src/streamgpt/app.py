"""The training task behind `train.py`: from a composed config to a finished (or resumed) run.

compose -> validate -> HeadStart (stream server, tokenizer; train.py opens it before importing
Lightning) -> find the checkpoint to resume -> DataModule, LitGPT, loggers, callbacks, Trainer ->
fit -> say where everything is. The embedded server is stopped and W&B is finished whatever
happens (errors, signals), so multirun jobs never leave a server behind or merge into one W&B run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import socket
import subprocess
import sys
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from streamgpt.attempts import attempt_dir, overrides
from streamgpt.callbacks import (
    GracefulStop,
    LossCurve,
    SampleGenerations,
    StartupReport,
    StepCheckpoint,
    StepProgressBar,
    StreamEndSync,
    ThroughputMonitor,
)
from streamgpt.checkpoints import AtomicCheckpointIO, newest_intact, readable
from streamgpt.config import validate
from streamgpt.data import StreamDataModule
from streamgpt.headstart import HeadStart, global_rank, local_rank
from streamgpt.lit_module import LitGPT
from streamgpt.loggers import RunRecord, build_loggers, checkpoint_identity
from streamgpt.perf import STARTUP, Peak, check_precision, device_peak, peak_rss_mb
from streamgpt.server.process import REPO
from streamgpt.signals import Stopped

log = logging.getLogger("streamgpt")

PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "tokenizers", "websockets", "wandb")


def train(cfg: DictConfig, head: HeadStart | None = None) -> float | None:
    """One run. `head`: the run's HeadStart, opened before Lightning was imported (train.py)."""
    if head is None:  # not from train.py, which validates before it opens the head start
        validate(cfg)
        with HeadStart(cfg) as head:
            return train(cfg, head)
    quiet_lightning()
    run_dir = Path(cfg.paths.output_dir)
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint = find_checkpoint(cfg, run_dir)
    rank0 = global_rank() == 0 and local_rank() == 0
    if rank0:
        record_run(cfg, attempt_dir(run_dir))
    loggers: list = []
    summary: list[str] = []
    exit_code = 1  # until fit returns
    try:
        stream = OmegaConf.merge(cfg.data.stream, {"url": head.urls()})
        STARTUP.mark("waiting for the stream server")
        if checkpoint is not None:
            adopt_run_files(checkpoint, run_dir)
        datamodule = StreamDataModule(stream, cfg.tokenizer, run_dir)
        model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "compile"}
        model = LitGPT(model_cfg, OmegaConf.to_container(cfg.optimizer), compile=cfg.model.compile)
        loggers = build_loggers(cfg, run_dir, checkpoint_identity(checkpoint))
        if rank0:
            for logger in loggers:
                _ = logger.experiment  # W&B starts now, while the tokenizer may still train
        STARTUP.mark("loggers (W&B) and model objects")
        head.wait()
        STARTUP.mark("waiting for the tokenizer and validation samples")
        peak = device_peak(compute_device(cfg), cfg.trainer.precision, cfg.peak_flops)
        log.info("perf/mfu is measured against %.4g FLOP/s: %s", peak.flops, peak.source)
        STARTUP.mark("peak FLOP/s (for perf/mfu)")
        trainer = build_trainer(cfg, run_dir, loggers, validation=stream.valid_size > 0, peak=peak)
        STARTUP.mark("trainer object")
        trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint)
        exit_code = 0
        if trainer.is_global_zero:
            summary = report(run_dir, trainer, head)
        metric = trainer.callback_metrics.get(cfg.optimized_metric)
        return float(metric) if metric is not None else None
    except Stopped as e:
        exit_code = e.exit_code
        raise
    finally:
        finish_loggers(loggers, exit_code)
        if summary:  # last, below W&B's own closing lines
            print("\n" + "\n".join(summary), flush=True)


def compute_device(cfg: DictConfig) -> torch.device:
    """The device this process trains on, as Lightning will pick it."""
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def quiet_lightning() -> None:
    """Lightning's lines once, in the run's log format, and without its product tips."""
    # Lightning calls a deprecated torch API on every batch; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # LitGPT reduces val/loss across ranks itself (and the step is the same everywhere).
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val/|step)")
    logger = logging.getLogger("lightning")
    for handler in list(logger.handlers):  # its own console handler: Hydra's root one prints too
        logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


# -- resuming ---------------------------------------------------------------------------------


def find_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        problem = readable(path)
        if problem:
            raise ValueError(f"ckpt_path={path} cannot be resumed from: {problem}")
        return str(path)
    if cfg.resume == "auto":
        path = newest_intact(run_dir / "checkpoints")
        if path is None:
            log.info(
                "resume=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints"
            )
            return None
        log.info("resume=auto: continuing from %s", path)
        return str(path)
    return None


def adopt_run_files(checkpoint: str, run_dir: Path) -> None:
    """Resuming another run's checkpoint here: take its tokenizer and validation set too."""
    source = Path(checkpoint).resolve().parent.parent
    if source == run_dir.resolve():
        return
    for name in ("tokenizer.json", "validation.jsonl"):
        if (source / name).exists() and not (run_dir / name).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, run_dir / name)


# -- what the run records ---------------------------------------------------------------------


def record_run(cfg: DictConfig, folder: Path) -> None:
    """Everything that made this attempt, beside its outputs: resolved config, versions, commit.
    `folder`: the run folder for a first attempt, its .hydra/attempt-<k>/ for later ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    versions = {}
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        versions[dist.metadata["Name"]] = dist.version
    info = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git": _git(),
        "key_packages": {p: versions.get(p) for p in PACKAGES},
        "packages": versions,
    }
    (folder / "environment.json").write_text(json.dumps(info, indent=2))


def _git() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# -- loggers, callbacks, trainer --------------------------------------------------------------


def build_trainer(
    cfg: DictConfig, run_dir: Path, loggers: list, validation: bool, peak: Peak
) -> L.Trainer:
    t, cb = cfg.trainer, cfg.callbacks
    samples = cb.samples
    checkpoints = run_dir / "checkpoints"
    callbacks = [
        ThroughputMonitor(peak.flops),  # first: it times the step before the other callbacks run
        GracefulStop(checkpoints),  # before the end-of-training callbacks: a stop skips them
        StreamEndSync(),
        SampleGenerations(
            run_dir,
            every=cb.sample_every,
            prompts=list(samples.prompts),
            n_auto=samples.n_auto,
            max_new_tokens=samples.max_new_tokens,
            temperature=samples.temperature,
            top_k=samples.top_k,
            top_p=samples.top_p,
            seed=samples.seed,
        ),
        LossCurve(run_dir, every=cb.sample_every),
        StepCheckpoint(checkpoints, cb.checkpoint_every, cb.n_saved, validation),
        StartupReport(run_dir, compiled=cfg.model.compile),
        RunRecord(
            OmegaConf.to_container(cfg, resolve=True),
            {"peak_flops": peak.flops, "peak_flops_source": peak.source},
            overrides(),
        ),
    ]
    if t.progress_bar:
        callbacks.append(StepProgressBar())
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_every if validation else None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if validation else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        deterministic=t.deterministic,
        enable_progress_bar=t.progress_bar,
        enable_autolog_hparams=False,  # RunRecord logs the whole config once, nested
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        **t.kwargs,
    )


def finish_loggers(loggers: list, exit_code: int) -> None:
    for logger in loggers:
        with contextlib.suppress(Exception):
            logger.finalize("success" if exit_code == 0 else "failed")
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def report(run_dir: Path, trainer: L.Trainer, head: HeadStart) -> list[str]:
    step = trainer.global_step
    memory = {"trainer": peak_rss_mb()}
    if head.server is not None and head.server.proc is not None:
        memory["server"] = peak_rss_mb(head.server.proc.pid)
    perf_file = run_dir / "perf.json"
    perf = json.loads(perf_file.read_text()) if perf_file.exists() else {}
    perf["peak_rss_mb"] = memory
    perf_file.write_text(json.dumps(perf, indent=2))
    lines = [
        f"run folder:  {run_dir}",
        f"samples:     {run_dir / 'samples' / f'iter_{step}'}",
        f"loss curve:  {run_dir / 'training_curve_LOSS.png'}",
        f"checkpoints: {run_dir / 'checkpoints'}",
        "peak memory: "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items() if v is not None)
        + f" (RSS; start-up times in {perf_file})",
    ]
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            run = logger.experiment
            offline = getattr(run.settings, "_offline", False) or run.settings.mode == "offline"
            where = Path(run.dir).parent
            lines.append(
                f"W&B run:     {where} (offline; to view: wandb sync {where})"
                if offline
                else f"W&B run:     {run.url}"
            )
        elif type(logger).__name__ == "CSVLogger":
            lines.append(f"metrics:     {Path(logger.log_dir) / 'metrics.csv'}")
    return lines
