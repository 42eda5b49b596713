"""Lightning callbacks: what a researcher watches while a model trains from a stream."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class DataWaitMonitor(L.Callback):
    """Logs `perf/data_wait_s`: how long each step waited for its batch.

    Measured in the training process from the end of one step to the start of the next, which is
    where a starving trainer loses time, whatever the DataLoader workers are doing.
    """

    def __init__(self) -> None:
        self._step_end: float | None = None
        self.total_s = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        now = time.perf_counter()
        if self._step_end is not None:
            wait = now - self._step_end
            self.total_s += wait
            pl_module.log("perf/data_wait_s", wait, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        self._step_end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step_end = None  # validation time is not waiting for training data

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._step_end = None  # nor is writing a checkpoint


class StreamEndSync(L.Callback):
    """Stops every rank after the same step when a finite stream runs out.

    A server with a configured end (end.max_epochs / end.max_samples) gives consumers different
    amounts of text; a rank whose data ended would leave the others waiting forever in the next
    gradient all-reduce. Each batch says whether it is its consumer's last; as soon as any rank
    trains a last batch, all ranks stop after that step. Endless streams (the default) never pay
    for the extra all-reduce.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "finite", False):
            return
        ended = trainer.strategy.reduce_boolean_decision(datamodule.saw_last_batch, all=False)
        if ended:
            trainer.should_stop = True
