"""The device's peak FLOP/s, the denominator of perf/mfu: given, known (Lightning's table of
GPUs), or measured once per machine with a matmul probe and kept in the user's cache."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from streamgpt.atomic import write_atomic
from streamgpt.cache import cache_dir

log = logging.getLogger("streamgpt")


def compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def matmul_flops(device: torch.device | str, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of square matmuls on this device and dtype: the best of three rounds over
    sizes from 256 up, stopping early where a single product is slow (bfloat16 on a CPU without
    it can be 100x slower than float32). On a shared machine a short probe catches a busy moment
    and reads low (MFU above 1 later), hence several rounds of `seconds` in all."""
    device = torch.device(device)
    best = 0.0
    # A GPU needs large products to reach its peak; the early stop below bounds a slow device.
    sizes = (256, 512, 1024, 2048) + ((4096, 8192) if device.type == "cuda" else ())
    budget = seconds / 3 / len(sizes)
    for _round in range(3):
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


@dataclass
class Peak:
    """A device's peak FLOP/s for perf/mfu, and where the figure comes from (said beside it)."""

    flops: float
    source: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_peak(device: torch.device | str, precision: str, given: float | None = None) -> Peak:
    """The peak MFU is measured against: `given` (the config's peak_flops), else the datasheet
    figure of a known GPU (Lightning's table), else a matmul probe cached per machine."""
    device = torch.device(device)
    if given:
        return Peak(float(given), "peak_flops from the config")
    dtype = compute_dtype(precision)
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        flops = get_available_flops(device, dtype)
        if flops:
            return Peak(float(flops), f"datasheet peak of {device_name(device)} ({dtype})")
    return probed_peak(device, dtype)


def probed_peak(device: torch.device, dtype: torch.dtype, cache: Path | None = None) -> Peak:
    """The matmul probe's figure for this machine, device, dtype, thread count and torch build,
    measured once (a few seconds) and kept in <cache>/peak_flops.json."""
    path = cache or cache_dir() / "peak_flops.json"
    key = (
        f"{device_name(device)} | {dtype} | {torch.get_num_threads()} threads | "
        f"torch {torch.__version__}"
    )
    known: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
    entry = known.get(key)
    if not isinstance(entry, dict) or not entry.get("flops", 0) > 0:
        started = time.perf_counter()
        entry = {
            "flops": matmul_flops(device, dtype),
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        log.info(
            "measured the matmul peak of this machine for perf/mfu: %.1f GFLOP/s (%s, %.1f s; "
            "kept in %s)",
            entry["flops"] / 1e9,
            dtype,
            time.perf_counter() - started,
            path,
        )
        known[key] = entry
        with contextlib.suppress(OSError):
            write_atomic(path, json.dumps(known, indent=2))
    return Peak(
        float(entry["flops"]),
        f"matmul probe of {key.split(' | ')[0]} ({dtype}), measured {entry['measured']}, "
        f"kept in {path}",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
