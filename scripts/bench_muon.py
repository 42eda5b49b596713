"""What Muon's Newton-Schulz dtype costs a training step on this machine, in one run.

babygpt-tiny (fp32, batch 32 x 128, vocabulary 2048: the CPU demo's step, as in bench_train.py): the
forward and backward pass, for scale; optimizer=muon's whole step (Muon on the blocks' matrices,
AdamW on the rest) with Newton-Schulz in bfloat16 and in float32; and Muon alone on the blocks'
matrices, torch.optim.Muon (always bfloat16) against streamgpt.muon.Muon in each dtype. The
variants take turns, `--rounds` times, and each row is the median of its timings (this machine's
speed drifts). The load average is printed too: with other work on the cores, torch's threads wait
for each other at every small product, and float32's many short ones suffer most (use --threads 1).

    python scripts/bench_muon.py [--rounds 3] [--model babygpt-tiny] [--vocab 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import BATCH, load_config

from streamgpt.linear import cpu_has_native_bf16
from streamgpt.model import GPT
from streamgpt.muon import Muon
from streamgpt.optim import OptimizerConfig, build_optimizer

MUON = {"name": "muon", "lr": 0.02, "adam_lr": 1e-3}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def variants(name: str, vocab: int) -> dict:
    """Each variant's step as a function of no arguments, on a model with its gradients set."""
    torch.manual_seed(0)
    cfg = load_config(name, vocab)
    model = GPT(cfg)
    batch = BATCH[name]
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.context))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()

    forward_backward()  # gradients for the optimizers to step on; the same ones every step
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2]
    steps = {"forward + backward": forward_backward}
    for dtype in ("bfloat16", "float32"):
        opt = build_optimizer(model, OptimizerConfig(**MUON, muon_ns_dtype=dtype), "cpu")
        steps[f"optimizer=muon step, NS {dtype}"] = opt.step
    steps["torch.optim.Muon alone (NS bfloat16)"] = torch.optim.Muon(matrices, lr=0.02).step
    for dtype in (torch.bfloat16, torch.float32):
        ours = Muon(matrices, lr=0.02, ns_dtype=dtype)
        steps[f"streamgpt Muon alone, NS {str(dtype).removeprefix('torch.')}"] = ours.step
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="babygpt-tiny")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = variants(args.model, args.vocab)
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, step in steps.items():
            times[label].append(timed(step))
    native = "native" if cpu_has_native_bf16() else "no native"
    print(
        f"{args.model}, vocabulary {args.vocab}, {torch.get_num_threads()} threads, "
        f"a CPU with {native} bfloat16; load average {os.getloadavg()[0]:.1f} (1 min, at the end)"
    )
    print("\n| step | ms (median) | x forward + backward |")
    print("|---|---|---|")
    scale = statistics.median(times["forward + backward"])
    for label, samples in times.items():
        ms = statistics.median(samples)
        print(f"| {label} | {ms * 1e3:.0f} | {ms / scale:.2f} |")


if __name__ == "__main__":
    main()
