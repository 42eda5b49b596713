"""Measuring the machine: matmul peak FLOP/s (for MFU), and whether a precision runs well here."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("streamgpt")

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def matmul_flops(device: torch.device | str, dtype: torch.dtype, seconds: float = 0.6) -> float:
    """Sustained FLOP/s of square matmuls on this device and dtype: the best over sizes from 256
    up, stopping early where a single product is slow (bfloat16 on a CPU without it can be 100x
    slower than float32). MFU is measured against this."""
    device = torch.device(device)
    best, budget = 0.0, seconds / 4
    # A GPU needs large products to reach its peak; the early stop below bounds a slow device.
    sizes = (256, 512, 1024, 2048) + ((4096, 8192) if device.type == "cuda" else ())
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        # F.linear, the kernel nn.Linear uses (on CPUs, bfloat16 `@` takes a far slower path).
        F.linear(a, b)  # warm-up (kernel selection, allocation)
        _sync(device)
        runs, started = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - started < budget:
            F.linear(a, b)
            runs += 1
            _sync(device)
        elapsed = time.perf_counter() - started
        best = max(best, 2 * n**3 * runs / elapsed)
        if elapsed / runs > budget / 4:  # the next size would take 8x longer
            break
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_precision(precision: str, accelerator: str) -> str:
    """The precision to use: the one asked for, or a clear error; slow choices are warned about."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda:
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision={precision}: this GPU has no bfloat16 (compute capability < 8.0); "
                "use precision=16-mixed (or 32-true)"
            )
        return precision
    if precision.startswith("16"):
        raise ValueError(
            f"precision={precision} needs a GPU (float16 autocast on a CPU is not supported by "
            "Lightning); on a CPU use precision=32-true, or bf16-mixed"
        )
    if precision.startswith("bf16") and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning(
            "precision=%s on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it runs, "
            "but matrix products are several times slower than float32 here "
            "(scripts/bench_train.py measures it); precision=32-true is faster on this machine",
            precision,
        )
    return precision


class Startup:
    """Where the time goes between `python train.py` and the first optimizer steps.

    Each `mark(phase)` says that `phase` ended now; a phase lasts from the previous mark (the
    first from the process's start). The StartupReport callback reports them after step 2.
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
