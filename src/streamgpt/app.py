"""The training task behind `train.py`: from a composed config to a finished (or resumed) run.

compose -> validate -> HeadStart (stream server, tokenizer; train.py opens it before importing
Lightning) -> find the checkpoint to resume -> DataModule, LitGPT, loggers, callbacks, Trainer ->
fit -> say where everything is. The embedded server is stopped and W&B is finished whatever
happens (errors, Ctrl-C), so multirun jobs never leave a server behind or merge into one W&B run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from streamgpt.callbacks import (
    LossCurve,
    SampleGenerations,
    StartupReport,
    StepCheckpoint,
    StreamEndSync,
    ThroughputMonitor,
)
from streamgpt.checkpoints import AtomicCheckpointIO, newest_intact, readable
from streamgpt.config import validate
from streamgpt.data import StreamDataModule
from streamgpt.headstart import HeadStart, global_rank, local_rank
from streamgpt.lit_module import LitGPT
from streamgpt.perf import STARTUP, check_precision, peak_rss_mb
from streamgpt.server.process import REPO

log = logging.getLogger("streamgpt")

PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "tokenizers", "websockets", "wandb")


def train(cfg: DictConfig, head: HeadStart | None = None) -> float | None:
    """One run. `head`: the run's HeadStart, opened before Lightning was imported (train.py)."""
    if head is None:  # not from train.py, which validates before it opens the head start
        validate(cfg)
        with HeadStart(cfg) as head:
            return train(cfg, head)
    # Lightning calls a deprecated torch API on every batch; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    run_dir = Path(cfg.paths.output_dir)
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True)
    checkpoint = find_checkpoint(cfg, run_dir)
    rank0 = global_rank() == 0 and local_rank() == 0
    if rank0:
        record_run(cfg, run_dir)
    loggers: list = []
    summary: list[str] = []
    try:
        stream = OmegaConf.merge(cfg.data.stream, {"url": head.urls()})
        STARTUP.mark("waiting for the stream server")
        if checkpoint is not None:
            adopt_run_files(checkpoint, run_dir)
        datamodule = StreamDataModule(stream, cfg.tokenizer, run_dir)
        model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "compile"}
        model = LitGPT(
            model_cfg,
            OmegaConf.to_container(cfg.optimizer),
            compile=cfg.model.compile,
            peak_flops=cfg.peak_flops,
        )
        loggers = build_loggers(cfg, run_dir, checkpoint)
        if rank0:
            for logger in loggers:
                _ = logger.experiment  # W&B starts now, while the tokenizer may still train
        trainer = build_trainer(cfg, run_dir, loggers, validation=stream.valid_size > 0)
        STARTUP.mark("loggers (W&B), model and trainer objects")
        head.wait()
        STARTUP.mark("waiting for the tokenizer and validation samples")
        trainer.fit(model, datamodule=datamodule, ckpt_path=checkpoint)
        if trainer.is_global_zero:
            summary = report(run_dir, trainer, head)
        metric = trainer.callback_metrics.get(cfg.optimized_metric)
        return float(metric) if metric is not None else None
    finally:
        finish_loggers(loggers)
        if summary:  # last, below W&B's own closing lines
            print("\n" + "\n".join(summary), flush=True)


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


def record_run(cfg: DictConfig, run_dir: Path) -> None:
    """Everything that made this run, beside its outputs: resolved config, versions, commit."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
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
    (run_dir / "environment.json").write_text(json.dumps(info, indent=2))


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


def run_names(cfg: DictConfig) -> tuple[str, str]:
    """(W&B group, run name): the experiment (and sweep), and this run's overrides."""
    if not HydraConfig.initialized():  # called outside a Hydra app (tests, notebooks)
        return "default", "default"
    hydra = HydraConfig.get()
    name = hydra.job.override_dirname or "default"
    group = hydra.runtime.choices.get("experiment") or "default"
    if hydra.mode == RunMode.MULTIRUN:
        group = f"{group}/sweep-{Path(hydra.sweep.dir).name}"
    return group, name


def build_loggers(cfg: DictConfig, run_dir: Path, checkpoint: str | None) -> list:
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return [CSVLogger(run_dir, name="csv")]
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.logger.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run_id = None
    if checkpoint is not None:
        run_id = torch.load(checkpoint, map_location="cpu", weights_only=True).get("wandb_run_id")
    group, name = run_names(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=name,
        group=group,
        tags=list(cfg.logger.tags),
        save_dir=str(run_dir),
        offline=mode == "offline",
        id=run_id,
        resume="allow" if run_id else None,
        config=config,
    )
    return [logger]


def build_trainer(cfg: DictConfig, run_dir: Path, loggers: list, validation: bool) -> L.Trainer:
    t, cb = cfg.trainer, cfg.callbacks
    samples = cb.samples
    callbacks = [
        ThroughputMonitor(),  # first: it times the step before the other callbacks run
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
        StepCheckpoint(run_dir / "checkpoints", cb.checkpoint_every, cb.n_saved, validation),
        StartupReport(run_dir, compiled=cfg.model.compile),
    ]
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
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        **t.kwargs,
    )


def finish_loggers(loggers: list) -> None:
    for logger in loggers:
        with contextlib.suppress(Exception):
            logger.finalize("success")
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


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
