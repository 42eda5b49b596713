"""glibc's allocator, told to keep freed large buffers for reuse instead of unmapping each one.

By default glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with its own
mmap and unmaps it on free, so a buffer allocated afresh every step or every message is faulted
in page by page, and zeroed by the kernel, each time. The server builds a reply of a few hundred
kB per request; a training step allocates logits, activations and gradients of up to hundreds of
MB. Keeping them in the heap cut the server's CPU per MB by half (scripts/bench_server.py) and the
CPU demo's page faults ~10x (BENCHMARKS.md). The heap then stays near its peak size, which a
process that repeats the same allocations reaches anyway. No effect, and no error, on other C
libraries (macOS, musl).

That heap fragments, though: a step's temporaries of one size are later carved into by smaller
ones, and the next step's do not fit the holes left, so the heap grows to two or three times what
the step holds live (the streaming tutorial's batch: a 920-970 MB process for ~400 MB of tensors).
`trainer.malloc=memory` (train.py, `allocator(mode)`) trades some speed for that memory: buffers of
4 MiB and more are mmapped and unmapped again on free, so they never fragment the heap, at the cost
of faulting them in each step (the tutorial's step ~5% slower; BENCHMARKS.md). Transparent huge
pages for those buffers (PyTorch's THP_MEM_ALLOC_ENABLE) were measured too: slower still here.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MODES = ("speed", "memory")
RELEASE_ABOVE = 4 << 20  # trainer.malloc=memory: buffers of this many bytes and more are mmapped


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


def allocator(mode: str) -> bool:
    """train.py's setting, `trainer.malloc`: "speed" keeps freed buffers of any size for reuse,
    "memory" keeps only those under 4 MiB (larger ones go back to the system on free). Returns
    whether glibc took it."""
    if mode not in MODES:
        raise ValueError(f"trainer.malloc must be one of {list(MODES)}, got {mode!r}")
    return keep_freed_memory(**({"mmap_threshold": RELEASE_ABOVE} if mode == "memory" else {}))
