"""Stopping on a signal without losing a step: Ctrl-C (SIGINT), preemption (SIGTERM), and SLURM's
requeue signal.

Before training starts, a signal stops the run at once: there is nothing to save yet. While it
trains, the first signal is noted and the run stops after the step in progress (and that step's
validation, if due): every rank agrees on the step, `checkpoints/last.ckpt` is written, and the
process exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), so a requeue
script can tell a stopped run from a finished one (0). A second Ctrl-C stops at once, without a
checkpoint (the last periodic one stays); a repeated SIGTERM changes nothing.

Under SLURM with Lightning's auto-requeue (its default there), the requeue signal (SIGUSR1 with
`#SBATCH --signal=SIGUSR1@90`) stops the same way, then requeues the job with `scontrol requeue`
as Lightning does; the requeued command (with `resume=auto`) continues from that checkpoint.
Lightning's own handler is not used: it writes its checkpoint from inside the signal handler, in
the middle of a step, which would lose or repeat a batch of the stream.

This module imports no Lightning: train.py installs the handlers before Lightning is imported.
endings.GracefulStop does the stopping.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("streamgpt")


class Stopped(Exception):
    """The run stopped on a signal; `checkpoint` holds its state (None: nothing was saved)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is not None:
            what = f"stopped by {name} after step {step}; saved {checkpoint}"
        elif step is not None:
            what = f"stopped by {name} at once during step {step + 1}, without a checkpoint"
        else:
            what = f"stopped by {name} before training started; nothing to save"
        super().__init__(what)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """The process's handlers for the stop signals (installed by train.py, in the main thread).

    Outside training a signal raises Stopped where the main thread is; during training
    (`graceful`), the first is only noted, for GracefulStop to act on between steps.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.step: int | None = None  # the last step training finished
        self.graceful = False
        self.forward: Any = None  # Lightning's launcher of this node's other ranks, if it has one
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self, *signums: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a notebook thread, a test harness)
        self._pid = os.getpid()
        for signum in (signal.SIGINT, signal.SIGTERM, *signums):
            previous = signal.signal(signum, self._handle)
            if previous is not self._handle:
                self._previous.setdefault(signum, previous)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self.received, self.step, self.graceful, self.forward = None, None, False, None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process stops it
        if not self.graceful:
            self.received = signum  # kept, should the exception be swallowed on its way up
            raise Stopped(signum)
        if self.received is not None:
            if signum == signal.SIGINT and self.received == signal.SIGINT:
                raise Stopped(signum, step=self.step)
            return  # a repeated SIGTERM (schedulers resend it): the stop is already under way
        self.received = signum
        if signum == signal.SIGTERM and self.forward is not None:
            self.forward.kill(signum)  # ranks this process launched get it too
        log.warning(
            "%s: finishing the current step, saving a checkpoint, then exiting with %d%s",
            signal.Signals(signum).name,
            128 + signum,
            " (Ctrl-C again stops at once, without a checkpoint)"
            if signum == signal.SIGINT
            else "",
        )


SIGNALS = StopSignals()


def requeue() -> None:
    """Put this SLURM job back in the queue, as Lightning's auto-requeue does."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("not requeued: SLURM_JOB_ID=%r is not a job id", job)
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return
    if done.returncode == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr)
