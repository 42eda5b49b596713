"""The training run behind `train.py`: from the run's inputs to a finished (or resumed) run.

train.py: compose -> validate -> HeadStart (checkpoint, stream servers, tokenizer, validation
samples; opened before Lightning is imported). Here: loggers -> the inputs, handed to the
DataModule, the GPTModule and the callbacks -> Trainer -> fit -> say where everything is. W&B is
finished whatever happens (errors, signals) and train.py's HeadStart stops the embedded server,
so multirun jobs never leave a server behind or merge into one W&B run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from streamgpt.attempts import attempt_dir, overrides, record_run
from streamgpt.bpb import token_byte_lengths
from streamgpt.callbacks import LossCurve, SampleGenerations, StepCheckpoint, StepProgressBar
from streamgpt.checkpoint_io import AtomicCheckpointIO
from streamgpt.config import gpt_fields
from streamgpt.data import StreamDataModule
from streamgpt.endings import GracefulStop, StreamEndSync, TimeBudget
from streamgpt.flops import Peak, device_peak
from streamgpt.headstart import HeadStart, RunInputs, global_rank, local_rank
from streamgpt.lit_module import GPTModule, pad_vocab
from streamgpt.loggers import RunRecord, build_loggers, checkpoint_identity
from streamgpt.monitors import MixtureTokens, PerfReport, ThroughputMonitor
from streamgpt.perf import STARTUP
from streamgpt.signals import Stopped

log = logging.getLogger("streamgpt")


def train(cfg: DictConfig, head: HeadStart) -> float | None:
    """One run. `head`: the run's setup, opened (train.py) before Lightning was imported."""
    quiet_lightning()
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if global_rank() == 0 and local_rank() == 0:
        record_run(cfg, attempt_dir(run_dir))
    loggers: list = []
    summary: list[str] = []
    exit_code = 1  # until fit returns
    try:
        loggers = build_loggers(cfg, checkpoint_identity(head.checkpoint))
        for logger in loggers if global_rank() == 0 else []:
            _ = logger.experiment  # W&B starts now, while the tokenizer may still train
        STARTUP.mark("loggers (W&B)")
        inputs = head.inputs()
        STARTUP.mark("waiting for the stream server, tokenizer and validation samples")
        tokenizer = inputs.setup.tokenizer()
        datamodule = StreamDataModule(inputs.stream, cfg.tokenizer, run_dir, setup=inputs.setup)
        model_cfg = gpt_fields(OmegaConf.to_container(cfg.model))
        model_cfg["vocab_size"] = model_cfg["vocab_size"] or pad_vocab(tokenizer.get_vocab_size())
        model = GPTModule(
            model_cfg,
            OmegaConf.to_container(cfg.optimizer),
            compile=cfg.model.compile,
            eos_token=cfg.tokenizer.eos_token,
            init_from=fresh_init(cfg.model.init_from, inputs.checkpoint),
        )
        model.set_token_bytes(token_byte_lengths(tokenizer))  # for val/bpb
        peak = device_peak(compute_device(cfg), cfg.trainer.precision, cfg.peak_flops)
        log.info("perf/mfu is measured against %.4g FLOP/s: %s", peak.flops, peak.source)
        STARTUP.mark("model object and peak FLOP/s (for perf/mfu)")
        callbacks = build_callbacks(
            cfg, run_dir, inputs, datamodule, tokenizer, peak, head.server_pid
        )
        # With trainer.budget_s, the lr schedule follows the budget's time.
        model.clock = next((c for c in callbacks if isinstance(c, TimeBudget)), None)
        trainer = build_trainer(cfg, run_dir, loggers, callbacks, inputs.stream.valid_size > 0)
        STARTUP.mark("trainer object")
        trainer.fit(model, datamodule=datamodule, ckpt_path=inputs.checkpoint)
        exit_code = 0
        if trainer.is_global_zero:
            summary = report(run_dir, trainer)
        metric = trainer.callback_metrics.get(cfg.optimized_metric)
        return float(metric) if metric is not None else None
    except Stopped as e:
        exit_code = e.exit_code
        raise
    finally:
        finish_loggers(loggers, exit_code)
        if summary:  # last, below W&B's own closing lines
            print("\n" + "\n".join(summary), flush=True)


def fresh_init(init_from: str | None, checkpoint: str | None) -> str | None:
    """model.init_from for a fresh run; a resume's weights are its checkpoint's."""
    if init_from and checkpoint:
        log.info("resuming from %s: model.init_from=%s is not loaded", checkpoint, init_from)
        return None
    return init_from


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
    # GPTModule reduces val/loss across ranks itself (and the step is the same everywhere).
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


# -- loggers, callbacks, trainer --------------------------------------------------------------


def build_callbacks(
    cfg: DictConfig,
    run_dir: Path,
    inputs: RunInputs,
    datamodule: StreamDataModule,
    tokenizer: Tokenizer,
    peak: Peak,
    server_pid: Callable[[], int | None],
) -> list[L.Callback]:
    cb, samples = cfg.callbacks, cfg.callbacks.samples
    checkpoints = run_dir / "checkpoints"
    validation = inputs.stream.valid_size > 0
    callbacks = [
        ThroughputMonitor(peak.flops),  # first: it times the step before the other callbacks run
        GracefulStop(checkpoints),  # before the end-of-training callbacks: a stop skips them
        StreamEndSync(datamodule),
        *([TimeBudget(cfg.trainer.budget_s, run_dir)] if cfg.trainer.budget_s else []),
        MixtureTokens(datamodule),  # after the callbacks that stop: the last step is logged
        SampleGenerations(
            run_dir,
            tokenizer,
            tokenizer.token_to_id(cfg.tokenizer.eos_token),
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
        PerfReport(run_dir, compiled=cfg.model.compile, server_pid=server_pid),
        RunRecord(
            OmegaConf.to_container(cfg, resolve=True),
            {
                "peak_flops": peak.flops,
                "peak_flops_source": peak.source,
                "tokenizer_vocab_size": tokenizer.get_vocab_size(),
            },
            overrides(),
        ),
    ]
    for key, conf in cfg.callbacks.extra.items():  # any Lightning callback, from YAML
        callback = instantiate(conf)
        if not isinstance(callback, L.Callback):
            raise ValueError(f"callbacks.extra.{key}: {conf._target_} is not a Lightning callback")
        callbacks.append(callback)
    if cfg.trainer.progress_bar:
        callbacks.append(StepProgressBar())
    return callbacks


def build_trainer(
    cfg: DictConfig, run_dir: Path, loggers: list, callbacks: list, validation: bool
) -> L.Trainer:
    t = cfg.trainer
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
        profiler=instantiate(t.profiler) if OmegaConf.is_dict(t.profiler) else t.profiler,
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


def report(run_dir: Path, trainer: L.Trainer) -> list[str]:
    step = trainer.global_step
    perf_file = run_dir / "perf.json"
    memory = json.loads(perf_file.read_text()).get("peak_rss_mb", {}) if perf_file.exists() else {}
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
        elif type(logger).__name__ == "TensorBoardLogger":
            lines.append(f"TensorBoard: tensorboard --logdir {logger.root_dir}")
    return lines
