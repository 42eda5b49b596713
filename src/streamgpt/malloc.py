"""glibc's allocator, told to keep freed large buffers for reuse instead of unmapping each one.

By default glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with its own
mmap and unmaps it on free, so a buffer allocated afresh every step or every message is faulted
in page by page, and zeroed by the kernel, each time. The server builds a reply of a few hundred
kB per request; a training step allocates logits, activations and gradients of up to hundreds of
MB. Keeping them in the heap cut the server's CPU per MB by half (scripts/bench_server.py) and the
CPU demo's page faults ~10x (BENCHMARKS.md). The heap then stays near its peak size, which a
process that repeats the same allocations reaches anyway. No effect, and no error, on other C
libraries (macOS, musl).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve allocations below `mmap_threshold` bytes from the heap, and keep up to
    `trim_threshold` bytes of freed heap. Returns whether glibc took the settings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
            and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
            and libc.mallopt(M_TOP_PAD, 64 << 20)
        )
    except (OSError, AttributeError):
        return False
