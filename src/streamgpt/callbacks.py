"""Lightning callbacks: what a researcher watches while a model trains from a stream.

- SampleGenerations: text from fixed prompts and unconditional samples every `every` steps.
- LossCurve: training_curve_LOSS.png (train and validation loss against steps and tokens).
- StepCheckpoint: checkpoints every `every` steps, the best n by val/loss plus last.ckpt.
- ThroughputMonitor: perf/data_wait_s, perf/tokens_per_s, perf/mfu.
- StreamEndSync: all ranks stop after the same step when a finite stream runs out.
- GracefulStop: on SIGINT / SIGTERM / SLURM's requeue signal, a checkpoint of the step, then exit.
- PerfReport: perf.json: where the seconds before the first optimizer step went; peak memory.
- StepProgressBar: optimizer steps out of max_steps (resumed runs too), not epochs.
All files are written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from tokenizers import Tokenizer

from streamgpt.atomic import replacing, write_atomic
from streamgpt.cache import cache_dir
from streamgpt.perf import STARTUP, peak_rss_mb
from streamgpt.signals import SIGNALS, Stopped, StopSignals, requeue

if TYPE_CHECKING:
    from streamgpt.data import StreamDataModule

log = logging.getLogger("streamgpt")


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers: tables and images go through them, at the global step."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class SampleGenerations(L.Callback):
    """Every `every` steps on rank 0: each prompt's continuation and `n_auto` samples from
    scratch (after an end-of-text token, i.e. a new document), written to
    <run>/samples/iter_<step>/{manual,auto}_<i>.txt and to a W&B table that grows over the run.
    Sampling uses the uncompiled model and a fixed seed per sample, so steps compare fairly."""

    def __init__(
        self,
        run_dir: str | Path,
        tokenizer: Tokenizer,
        eos_id: int,
        every: int,
        prompts: list[str],
        n_auto: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = 0.95,
        seed: int = 0,
    ) -> None:
        self.dir = Path(run_dir) / "samples"
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.every = every
        self.prompts = list(prompts)
        self.n_auto = n_auto
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = seed
        self.rows: list[list[Any]] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step != self._last_step:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.sample(trainer, pl_module)

    @torch.no_grad()
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[list[Any]]:
        self._last_step = step = trainer.global_step
        if not trainer.is_global_zero:
            return []
        tokenizer, eos = self.tokenizer, self.eos_id
        model = pl_module.gpt  # never the compiled wrapper: it would recompile for every length
        was_training = model.training
        model.eval()
        folder = self.dir / f"iter_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        jobs = [("manual", i, p) for i, p in enumerate(self.prompts)]
        jobs += [("auto", i, "") for i in range(self.n_auto)]
        try:
            for n, (kind, i, prompt) in enumerate(jobs):
                ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
                generator = torch.Generator(model.tok_emb.weight.device).manual_seed(self.seed + n)
                new = model.generate(
                    ids,
                    self.max_new_tokens,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    eos_id=eos,
                    generator=generator,
                )
                text = tokenizer.decode(ids + new)
                write_atomic(folder / f"{kind}_{i}.txt", text.encode())
                rows.append([step, kind, prompt, text])
        finally:
            model.train(was_training)
        self.rows += rows
        for logger in _wandb_loggers(trainer):
            logger.log_table("samples", ["step", "kind", "prompt", "text"], self.rows, step=step)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = state.get("rows", [])


class LossCurve(L.Callback):
    """<run>/training_curve_LOSS.png: train and validation loss against steps (bottom axis) and
    tokens (top axis), redrawn every `every` steps and at the end, and logged to W&B."""

    def __init__(self, run_dir: str | Path, every: int) -> None:
        self.path = Path(run_dir) / "training_curve_LOSS.png"
        self.every = every
        self.train: list[tuple[int, int, float]] = []  # (step, tokens, loss)
        self.val: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Reading the loss syncs a GPU; once per logging interval is enough for a curve.
        if step % max(1, trainer.log_every_n_steps) == 0 and outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append((step, pl_module.tokens_seen, float(loss)))
        if self.every > 0 and step % self.every == 0 and trainer.is_global_zero:
            self.draw(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        self.val.append((trainer.global_step, pl_module.tokens_seen, loss))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.draw(trainer)

    def draw(self, trainer: L.Trainer | None = None) -> Path | None:
        if not self.train and not self.val:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
        if self.train:
            steps, _, losses = zip(*self.train, strict=True)
            ax.plot(steps, losses, lw=1, label="train")
        if self.val:
            steps, _, losses = zip(*self.val, strict=True)
            ax.plot(steps, losses, "o-", ms=4, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (cross-entropy, nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        last = (self.train or self.val)[-1]
        per_step = last[1] / last[0] if last[0] else 0
        if per_step:
            top = ax.secondary_xaxis(
                "top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step)
            )
            top.set_xlabel("tokens (millions)")
        fig.tight_layout()
        with replacing(self.path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        for logger in _wandb_loggers(trainer) if trainer is not None else []:
            logger.log_image("training_curve_LOSS", [str(self.path)], step=trainer.global_step)
        return self.path

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = [tuple(r) for r in state.get("train", [])]
        self.val = [tuple(r) for r in state.get("val", [])]


class StepCheckpoint(ModelCheckpoint):
    """A checkpoint every `every` steps: the best `n_saved` by val/loss, plus last.ckpt.

    Saved right after that step's validation, so the ranking uses the fresh val/loss (validation
    must run at those steps: `every` a multiple of the validation interval). Without validation,
    the newest checkpoint is kept.
    """

    def __init__(self, dirpath: str | Path, every: int, n_saved: int, validation: bool) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="step={step:07d}-val_loss={val/loss:.4f}" if validation else "step={step:07d}",
            monitor="val/loss" if validation else None,
            mode="min",
            save_top_k=n_saved if validation else 1,
            save_last=True,
            auto_insert_metric_name=False,
            every_n_train_steps=0,
            every_n_epochs=0,
            save_on_train_epoch_end=False,
        )
        self.every = every
        self.validation = validation

    def _due(self, trainer: L.Trainer) -> bool:
        step = trainer.global_step
        return (
            self.every > 0
            and step > 0
            and step % self.every == 0
            and not trainer.sanity_checking
            and not self._should_skip_saving_checkpoint(trainer)
        )

    def _save_now(self, trainer: L.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        if not self.validation and self._due(trainer):
            self._save_now(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.validation and self._due(trainer):
            self._save_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # a stream has no epochs worth a checkpoint


class ThroughputMonitor(L.Callback):
    """perf/data_wait_s, perf/step_s, perf/tokens_per_s (global) and perf/mfu (per device).

    Put it first among the callbacks: a step's compute time is measured from its batch arriving
    to the end of its optimizer step, before any other callback (sampling, checkpointing) runs;
    the data wait from the end of everything after the previous step (the module stamps
    `hooks_done` once all callbacks and validation are through) to the next batch arriving.
    Throughput is tokens / (wait + compute): what the run really gets, minus our own reporting.
    MFU is measured against `peak_flops` (perf.device_peak says where that figure comes from); a
    step that beats it means the peak is wrong, so a value above 1 is never logged as MFU.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        self._start: float | None = None
        self._wait: float | None = None
        self._end: float | None = None
        self._warned_mfu = False
        self.total_wait_s = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        done = max(filter(None, (getattr(pl_module, "hooks_done", None), self._end)), default=None)
        self._wait = now - done if done is not None else None
        if self._wait is not None:
            self.total_wait_s += self._wait
            pl_module.log("perf/data_wait_s", self._wait)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._end = now
        compute = now - self._start
        pl_module.log("perf/step_s", compute)
        if self._wait is None:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["x"]
        rate = x.numel() * trainer.world_size / (compute + self._wait)
        pl_module.log("perf/tokens_per_s", rate)
        if self.peak_flops and hasattr(pl_module, "gpt"):
            flops = pl_module.gpt.flops_per_token(x.size(1)) * rate / trainer.world_size
            mfu = flops / self.peak_flops
            if mfu <= 1:
                pl_module.log("perf/mfu", mfu)
            elif not self._warned_mfu:
                self._warned_mfu = True
                log.warning(
                    "a step ran at %.1f GFLOP/s, above the peak of %.1f GFLOP/s that perf/mfu is "
                    "measured against; such steps are not logged as MFU. Set peak_flops=<FLOP/s "
                    "per device>, or delete the cached probe (%s) to measure again",
                    flops / 1e9,
                    self.peak_flops / 1e9,
                    cache_dir() / "peak_flops.json",
                )

    def on_validation_start(self, trainer, pl_module) -> None:
        self._end = None  # validation is not waiting for training data


class GracefulStop(L.Callback):
    """Stops training between steps when a stop signal came, with a checkpoint of that step.

    Put it before the callbacks that work at the end of training (samples, the loss curve): a
    stopped run does not spend its grace period on them.
    """

    def __init__(self, checkpoint_dir: str | Path, signals: StopSignals = SIGNALS) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signals = signals
        self.stopping: int | None = None
        self._requeue: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment  # what Lightning's handler reads
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal:
            self._requeue = int(env.requeue_signal)
        # Lightning has just set its own SIGTERM (and requeue) handlers: ours take over.
        self.signals.install(*([self._requeue] if self._requeue else []))
        launcher = trainer.strategy.launcher
        self.signals.forward = launcher if getattr(launcher, "procs", None) else None
        self.signals.graceful = True

    def _check(self, trainer: L.Trainer) -> None:
        self.signals.step = trainer.global_step
        asked = self.signals.received is not None
        if trainer.world_size > 1:  # a signal may reach the ranks at different steps
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if asked and self.stopping is None:
            self.stopping = self.signals.received or signal.SIGTERM
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.graceful = False
        if self.stopping is None:
            return
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: it is resumed
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if self.stopping != signal.SIGINT and hasattr(experiment, "mark_preempting"):
                experiment.mark_preempting()  # W&B shows it as preempted, not crashed
        if self.stopping == self._requeue and trainer.is_global_zero:
            requeue()
        raise Stopped(self.stopping, step=trainer.global_step, checkpoint=path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.signals.graceful = False


class StreamEndSync(L.Callback):
    """Stops every rank after the same step when a finite stream runs out.

    A server with a configured end (end.max_epochs / end.max_samples) gives consumers different
    amounts of text; a rank whose data ended would leave the others waiting forever in the next
    gradient all-reduce. Each batch says whether it is its consumer's last; as soon as any rank
    trains a last batch, all ranks stop after that step. Endless streams (the default) never pay
    for the extra all-reduce. `datamodule`: the run's StreamDataModule.
    """

    def __init__(self, datamodule: StreamDataModule) -> None:
        self.datamodule = datamodule

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if not self.datamodule.finite:
            return
        ended = trainer.strategy.reduce_boolean_decision(self.datamodule.saw_last_batch, all=False)
        if ended:
            trainer.should_stop = True


class PerfReport(L.Callback):
    """<run>/perf.json, its only writer (rank 0): the start-up breakdown from process start
    (`perf.STARTUP`, with the phases inside `fit` marked here), logged and written after the
    second step, and the peak memory of the trainer and the embedded server at the end.
    `server_pid`: the embedded server's current process id, or None."""

    def __init__(
        self,
        run_dir: str | Path,
        compiled: bool = False,
        server_pid: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.path = Path(run_dir) / "perf.json"
        self.first_step = "first step (compile included)" if compiled else "first step"
        self.server_pid = server_pid
        self.record: dict[str, Any] = {}
        self._steps = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        STARTUP.mark("datamodule prepare_data and setup")

    def on_train_batch_start(self, trainer, pl_module, *args: Any) -> None:
        if self._steps == 0:
            STARTUP.mark("first batch")

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self._steps += 1
        if self._steps == 1:
            STARTUP.mark(self.first_step)
        elif self._steps == 2:
            STARTUP.mark("second step")
            if trainer.is_global_zero:
                self.report()

    def report(self) -> None:
        phases = STARTUP.phases()
        to_first = sum(v for k, v in phases.items() if k != "second step")
        began = STARTUP.began()
        background = {k: t - began for k, t in STARTUP.background.items()}
        log.info(
            "%.1f s from process start to the first optimizer step: %s (in the background: %s)",
            to_first,
            ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
            ", ".join(f"{k} ready at {v:.1f}" for k, v in background.items()) or "nothing",
        )
        startup = {
            "to_first_step_s": to_first,
            "phases_s": phases,
            "background_ready_s": background,
        }
        self.record["startup"] = startup
        write_atomic(self.path, json.dumps(self.record, indent=2))

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        memory = {"trainer": peak_rss_mb()}
        pid = self.server_pid()
        if pid is not None:
            memory["server"] = peak_rss_mb(pid)
        self.record["peak_rss_mb"] = memory
        write_atomic(self.path, json.dumps(self.record, indent=2))


class StepProgressBar(RichProgressBar):
    """Optimizer steps out of `max_steps`, counting on from the checkpoint's step after a resume.

    Lightning's bar counts batches of epochs; a stream has one endless epoch ("Epoch 0/-2") and a
    resumed run would restart the count."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The bar shows `batch_idx + 1` done: make that the global step.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version (a W&B run id) is not a metric
        return metrics
