"""How a run ends before max_steps, as Lightning callbacks.

- GracefulStop: on SIGINT / SIGTERM / SLURM's requeue signal, a checkpoint of the step, then exit.
- StreamEndSync: all ranks stop after the same step when a finite stream runs out.
- TimeBudget: trainer.budget_s (budget.py) ends the run at the first step end past it.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from streamgpt.atomic import write_atomic
from streamgpt.perf import STARTUP
from streamgpt.signals import SIGNALS, Stopped, StopSignals, requeue

if TYPE_CHECKING:
    from streamgpt.data import StreamDataModule

log = logging.getLogger("streamgpt")


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


class TimeBudget(L.Callback):
    """Ends training after the optimizer step during which `budget_s` seconds from the process's
    start ran out (perf.STARTUP: start-up included; a multirun job from its own start), and is the
    clock the lr schedule follows (optim.timed_schedule reads `now` and `deadline`).

    `now` is read just before each optimizer step, rank 0's on every rank (the ranks step the same
    lr and stop after the same step): the scheduler, stepped right after the optimizer, sets the
    next step's lr from it, and the stopping step logs the floor. Validation, samples and
    last.ckpt of the stopping step are written as at any end (Lightning validates when a callback
    stops it). <run>/budget.json records the stop: the step, the clock at it and at the step
    before, the tokens trained, all in seconds from the process start.
    """

    def __init__(self, budget_s: float, run_dir: str | Path) -> None:
        self.budget_s = budget_s
        self.began = STARTUP.began()
        self.deadline = self.began + budget_s
        self.now = self.previous = self.train_start = time.time()
        self.stopped_at: int | None = None
        self._stepped = False  # an optimizer step since the last batch end (not an accumulation)
        self.path = Path(run_dir) / "budget.json"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # before configure_optimizers builds the schedule on it
            self.began, self.now = trainer.strategy.broadcast((self.began, time.time()))
            self.deadline = self.began + self.budget_s

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_start = time.time()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        now = time.time()
        if trainer.world_size > 1:
            now = trainer.strategy.broadcast(now)
        self.previous, self.now, self._stepped = self.now, now, True

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        if self._stepped and self.now >= self.deadline and self.stopped_at is None:
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            log.info(
                "trainer.budget_s=%g ran out: stopping after step %d (%.1f s from the start)",
                self.budget_s,
                trainer.global_step,
                self.now - self.began,
            )
        self._stepped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record = {
            "budget_s": self.budget_s,
            "stopped_by_budget": self.stopped_at is not None,
            "step": trainer.global_step,
            "tokens": getattr(pl_module, "tokens_seen", None),
            "train_start_s": self.train_start - self.began,  # start-up: process start to fit
            "previous_step_s": self.previous - self.began,  # the clock at the step before
            "last_step_s": self.now - self.began,  # and at the last step
        }
        write_atomic(self.path, json.dumps(record, indent=2) + "\n")
