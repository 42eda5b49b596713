"""How a run ends before max_steps, as Lightning callbacks.

- GracefulStop: on SIGINT / SIGTERM / SLURM's requeue signal, a checkpoint of the step, then exit.
- StreamEndSync: all ranks stop after the same step when a finite stream runs out.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

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
