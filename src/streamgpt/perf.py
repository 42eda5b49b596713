"""The run's own performance record: where start-up time goes, and peak memory. The
PerfReport callback writes both to <run>/perf.json."""

from __future__ import annotations

import time
from pathlib import Path


class Startup:
    """Where the time goes between `python train.py` and the first optimizer steps.

    Each `mark(phase)` says that `phase` ended now; a phase lasts from the previous mark (the
    first from the process's start). The PerfReport callback reports them after step 2.
    """

    def __init__(self) -> None:
        self.start: float | None = None  # None: the process's start
        self.marks: list[tuple[str, float]] = []
        self.background: dict[str, float] = {}  # work done beside the phases: when it was ready

    def ready(self, work: str) -> None:
        """Background `work` (headstart.HeadStart) is ready now."""
        self.background[work] = time.time()

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def restart(self) -> None:
        """The next run of a multirun process starts now."""
        self.start, self.marks, self.background = time.time(), [], {}

    def began(self) -> float:
        import psutil

        return self.start or psutil.Process().create_time()

    def phases(self) -> dict[str, float]:
        previous = self.began()
        phases: dict[str, float] = {}
        for phase, when in self.marks:
            phases[phase] = phases.get(phase, 0.0) + when - previous
            previous = when
        return phases


STARTUP = Startup()


def peak_rss_mb(pid: int | None = None) -> float | None:
    """Peak resident memory of a process (this one by default) in MB, from Linux's VmHWM."""
    try:
        status = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None
