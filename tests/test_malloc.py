"""streamgpt.malloc: freed large buffers are reused instead of faulted in afresh."""

from __future__ import annotations

import json
import subprocess
import sys

# Allocate, touch and free a 48 MB buffer again and again, as training steps do with their logits;
# count the page faults of the last 10 times (the heap takes a few rounds to settle).
CHURN = """
import json, resource, sys
import torch
from streamgpt.malloc import keep_freed_memory
tuned = sys.argv[1] == "tuned"
took = keep_freed_memory() if tuned else None
for i in range(30):
    if i == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12 << 20, dtype=torch.float32).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"took": took, "faults": faults}))
"""


def churn(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_kept_buffers_are_reused_instead_of_faulted_in_every_time():
    default, tuned = churn("default"), churn("tuned")
    assert tuned["took"] is True, "glibc refused the settings"
    pages = (48 << 20) // 4096
    assert default["faults"] > 9 * pages, default  # every allocation faulted in afresh
    assert tuned["faults"] < pages / 10, tuned  # the same memory, reused
