"""streamgpt.malloc: freed large buffers are reused instead of faulted in afresh (trainer.malloc
speed), or, from 4 MiB up, returned to the system (trainer.malloc memory)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .helpers.runs import train

# Allocate, touch and free a 48 MB buffer again and again, as training steps do with their logits;
# count the page faults of the last 10 times (the heap takes a few rounds to settle).
CHURN = """
import json, resource, sys
import torch
from streamgpt.malloc import allocator
mode, nbytes = sys.argv[1], int(sys.argv[2])
took = allocator(mode) if mode != "default" else None
for i in range(30):
    if i == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": faults}))
"""


def churn(mode: str, nbytes: int = 48 << 20) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode, str(nbytes)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_kept_buffers_are_reused_instead_of_faulted_in_every_time():
    default, tuned = churn("default"), churn("speed")
    assert tuned["took"] is True, "glibc refused the settings"
    pages = (48 << 20) // 4096
    assert default["faults"] > 9 * pages, default  # every allocation faulted in afresh
    assert tuned["faults"] < pages / 10, tuned  # the same memory, reused


def test_memory_mode_returns_large_buffers_and_keeps_small_ones():
    large, small = churn("memory", 48 << 20), churn("memory", 3 << 20)
    assert large["took"] is True, "glibc refused the settings"
    # 48 MB: unmapped on free, so faulted in again each of the 10 times
    assert large["faults"] > 9 * (48 << 20) // 4096, large
    assert small["faults"] < (3 << 20) // 4096 / 10, small  # under 4 MiB: reused


def test_an_unknown_mode_is_refused_by_name():
    from streamgpt.malloc import allocator

    with pytest.raises(ValueError, match=r"trainer\.malloc must be one of"):
        allocator("fast")


@pytest.mark.slow
def test_the_streaming_tutorial_trains_in_at_most_1_gib(tmp_path):
    """EIR's tutorial 01 as configured (batch 256 x 64, vocabulary 8192, dropout, the chunked loss
    and trainer.malloc=memory): six steps with two validations, samples and a checkpoint; the
    trainer's peak RSS (perf.json, VmHWM) at most 1 GiB. With trainer.malloc=speed it is
    1,142-1,190 MiB, with full logits 2.3-2.6 GiB (BENCHMARKS.md)."""
    run = tmp_path / "run"
    steps = ["trainer.max_steps=6", "trainer.val_every=3", "callbacks.sample_every=6"]
    steps += ["callbacks.checkpoint_every=6", "logger=none", "trainer.progress_bar=false"]
    done = train(run, "experiment=streaming_tutorial", *steps, small=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["tokens_seen"] == 6 * 256 * 64  # six full steps
    assert ckpt["hyper_parameters"]["model"]["vocab_size"] == 8192
    peak = json.loads((run / "perf.json").read_text())["peak_rss_mb"]["trainer"]
    assert 300 < peak <= 1024, f"trainer peak RSS {peak:.0f} MiB"
