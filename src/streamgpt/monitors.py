"""What a run measures of itself, as Lightning callbacks.

- ThroughputMonitor: perf/data_wait_s, perf/tokens_per_s, perf/mfu.
- MixtureTokens: data/tokens/<component> and data/token_share/<component> of a mixture.
- PerfReport: <run>/perf.json: where the seconds before the first optimizer step went; peak memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from streamgpt.atomic import write_atomic
from streamgpt.cache import cache_dir
from streamgpt.perf import STARTUP, peak_rss_mb

if TYPE_CHECKING:
    from streamgpt.data import StreamDataModule

log = logging.getLogger("streamgpt")


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


class MixtureTokens(L.Callback):
    """The realised mixture: data/tokens/<component> (tokens trained from each component of the
    server's mixture, all ranks, the whole run) and data/token_share/<component>, at the loggers'
    cadence. Nothing for a single source.

    Every rank counts its own batches (StreamDataModule.component_tokens, from the packer's
    attribution of each token to its sample); one all-reduce of those counts on the steps the
    loggers write, not every step. The run's totals before this process go into checkpoints.
    Put it after the callbacks that may stop training: a stopping step is always logged.
    """

    def __init__(self, datamodule: StreamDataModule) -> None:
        self.datamodule = datamodule
        self.before: dict[str, int] = {}  # the run's totals when this process resumed it

    def totals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
        names = self.datamodule.components
        counts = torch.tensor(self.datamodule.component_tokens, dtype=torch.int64)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum")
        return {
            n: self.before.get(n, 0) + int(k) for n, k in zip(names, counts.tolist(), strict=True)
        }

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        # The same decision on every rank (steps taken, should_stop): the all-reduce matches.
        if not self.datamodule.components or not trainer._logger_connector.should_update_logs:
            return
        totals = self.totals(trainer, pl_module)
        all_tokens = sum(totals.values())
        for name, n in totals.items():
            pl_module.log(f"data/tokens/{name}", float(n))
            if all_tokens:
                pl_module.log(f"data/token_share/{name}", n / all_tokens)

    def state_dict(self) -> dict[str, Any]:
        # Every rank saves a checkpoint together (the datamodule gathers its state too).
        trainer = getattr(self.datamodule, "trainer", None)
        if not self.datamodule.components or trainer is None:
            return {"tokens": dict(self.before)}
        return {"tokens": self.totals(trainer, trainer.lightning_module)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = dict(state.get("tokens", {}))


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
