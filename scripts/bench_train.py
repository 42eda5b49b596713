"""Training and generation speed on this machine, as ratios measured in one run (`make bench`).

For each model config (on a CPU: babygpt-tiny, streaming_tutorial, babygpt; on a GPU: babygpt,
gpt2-small) in fp32 and bf16-mixed, eager and torch.compile'd: training tokens/s (forward,
backward, AdamW step on batches already in memory) and MFU against the matmul peak of the same
dtype measured in this run. Then generation tokens/s for 256 new tokens with and without the KV
cache. On a CPU, first the allocator A/B: the CPU demo's step with glibc's default allocator and
with streamgpt.malloc's setting, in fresh processes; then the GELU A/B: fp32 GELU MLPs keep only
their input for backward and recompute the GELU there (linear.gelu_linear), against keeping both,
steps alternating in one process.

    python scripts/bench_train.py [--models babygpt-tiny,babygpt] [--seconds 6] [--no-compile]
        [--ab-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import streamgpt.model
from streamgpt.flops import matmul_flops
from streamgpt.malloc import keep_freed_memory
from streamgpt.model import GPT, GPTConfig
from streamgpt.optim import OptimizerConfig, build_optimizer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
VOCAB = 8192
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sequences per step. CPU: the demo's batch for the tiny model; smaller than the tutorials' for
# the larger ones, so a step takes seconds, not minutes (MFU hardly depends on it). GPU: the
# batches a run would use.
BATCH = (
    {"babygpt-tiny": 256, "streaming_tutorial": 256, "babygpt": 64, "gpt2-small": 16}
    if DEVICE == "cuda"
    else {"babygpt-tiny": 32, "streaming_tutorial": 64, "babygpt": 4, "gpt2-small": 1}
)
MODELS = "babygpt,gpt2-small" if DEVICE == "cuda" else "babygpt-tiny,streaming_tutorial,babygpt"


def load_config(name: str, vocab: int = VOCAB) -> GPTConfig:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg.pop("compile")
    cfg.pop("init_from")
    cfg["vocab_size"] = cfg["vocab_size"] or vocab
    cfg["dropout"] = 0.0
    return GPTConfig(**cfg)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def train_speed(
    name: str, dtype: torch.dtype, compiled: bool, seconds: float, vocab: int = VOCAB
) -> dict:
    torch.manual_seed(0)
    cfg = load_config(name, vocab)
    model = GPT(cfg).to(DEVICE)
    step_fn = torch.compile(model) if compiled else model
    optimizer = build_optimizer(model, OptimizerConfig(), DEVICE)
    batch = BATCH[name]
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context), device=DEVICE)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.context), device=DEVICE)
    autocast = (
        torch.autocast(DEVICE, dtype=torch.bfloat16)
        if dtype == torch.bfloat16
        else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            _, loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()  # warm-up; with compile, this is the compilation
    sync()
    warmup = time.perf_counter() - started
    step()
    sync()
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < seconds:
        step()
        steps += 1
    sync()
    elapsed = time.perf_counter() - started
    tokens_per_s = steps * batch * cfg.context / elapsed
    return {
        "tokens_per_s": tokens_per_s,
        "flops_per_s": tokens_per_s * model.flops_per_token(),
        "first_step_s": warmup,
        "steps": steps,
        "batch": [batch, cfg.context],
        "params": model.num_params(),
    }


def generation_speed(name: str, new_tokens: int = 256) -> dict:
    torch.manual_seed(0)
    cfg = load_config(name)
    model = GPT(cfg).to(DEVICE).eval()
    prompt = torch.randint(0, cfg.vocab_size, (16,)).tolist()
    rates = {}
    for use_cache in (True, False):
        started = time.perf_counter()
        out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        rates["cached" if use_cache else "recompute"] = len(out) / (time.perf_counter() - started)
    rates["speedup"] = rates["cached"] / rates["recompute"]
    return rates


def allocator_step(tuned: bool, seconds: float) -> dict:
    """One babygpt-tiny fp32 training step's time and page faults, in this (fresh) process."""
    import resource

    if tuned:
        keep_freed_memory()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    r = train_speed("babygpt-tiny", torch.float32, False, seconds, vocab=2048)
    steps = r["steps"] + 2
    r["faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return r


def allocator_ab(pairs: int, seconds: float) -> dict:
    """The CPU demo's step with glibc's default allocator and with train.py's setting
    (streamgpt.malloc), each in a fresh process, alternating."""
    import subprocess
    import sys

    rows = []
    for pair in range(pairs):
        rates = {}
        for tuned in (False, True) if pair % 2 == 0 else (True, False):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--allocator-step",
                    "tuned" if tuned else "default",
                    "--seconds",
                    str(seconds),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rates[tuned] = json.loads(out.strip().splitlines()[-1])
        rows.append(rates)
    ratio = sorted(r[True]["tokens_per_s"] / r[False]["tokens_per_s"] for r in rows)
    return {
        "speedup_median": ratio[len(ratio) // 2],
        "faults_per_step": {
            "default": rows[0][False]["faults_per_step"],
            "tuned": rows[0][True]["faults_per_step"],
        },
        "pairs": [{str(k): v for k, v in r.items()} for r in rows],
    }


def gelu_recompute_ab(steps: int = 20) -> dict:
    """Step time with the MLP's GELU recomputed in backward (the model's gelu_linear) and kept
    (layer(F.gelu(h)), autograd's way), steps alternating in one process (this machine's drift
    hits both alike). What it saves in memory: scripts/bench_memory.py's and bench_startup.py's
    peak RSS."""
    recompute = streamgpt.model.gelu_linear
    variants = {"recompute": recompute, "kept": lambda h, layer: layer(F.gelu(h))}
    results = {}
    try:
        for name in ("babygpt-tiny", "streaming_tutorial", "babygpt"):
            torch.manual_seed(0)
            cfg = load_config(name)
            model = GPT(cfg)
            optimizer = build_optimizer(model, OptimizerConfig(), DEVICE)
            x = torch.randint(0, cfg.vocab_size, (BATCH[name], cfg.context))
            y = torch.randint(0, cfg.vocab_size, (BATCH[name], cfg.context))
            times: dict[str, list[float]] = {v: [] for v in variants}
            for i in range(4 + steps):  # 4 warm-up steps, two of each
                variant = ("recompute", "kept")[i % 2]
                streamgpt.model.gelu_linear = variants[variant]
                started = time.perf_counter()
                _, loss = model(x, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= 4:
                    times[variant].append(time.perf_counter() - started)
            ratios = sorted(k / r for k, r in zip(times["kept"], times["recompute"], strict=True))
            results[name] = {
                "speed_recompute_over_kept": ratios[len(ratios) // 2],
                "ratios": ratios,
            }
    finally:
        streamgpt.model.gelu_linear = recompute
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--ab-only", action="store_true", help="only the CPU A/Bs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--allocator-step", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    if args.allocator_step:
        print(json.dumps(allocator_step(args.allocator_step == "tuned", args.seconds)))
        return
    ab = allocator_ab(3, args.seconds) if DEVICE == "cpu" else None
    keep_freed_memory()  # as train.py does
    gelu = gelu_recompute_ab() if DEVICE == "cpu" else None
    models = [] if args.ab_only else args.models.split(",")

    # This machine's speed drifts by 2x over minutes (a shared host), so each setting's MFU is
    # taken against the matmul peak of its dtype measured right before and right after it.
    results: dict = {
        "device": DEVICE,
        "threads": torch.get_num_threads(),
        "train": [],
        "generate": {},
    }
    print(DEVICE, torch.cuda.get_device_name() if DEVICE == "cuda" else "", end=" ")
    print(f"{torch.get_num_threads()} threads")
    if models:
        print(
            "\n| model | precision | compile | tokens/s | matmul peak GFLOP/s | MFU "
            "| first step s |"
        )
        print("|---|---|---|---|---|---|---|")
    for name in models:
        for dtype, label in ((torch.float32, "32-true"), (torch.bfloat16, "bf16-mixed")):
            for compiled in (False,) if args.no_compile else (False, True):
                before = matmul_flops(DEVICE, dtype)
                r = train_speed(name, dtype, compiled, args.seconds)
                peak = (before + matmul_flops(DEVICE, dtype)) / 2
                r |= {
                    "model": name,
                    "precision": label,
                    "compile": compiled,
                    "peak_flops": peak,
                    "mfu": r["flops_per_s"] / peak,
                }
                results["train"].append(r)
                print(
                    f"| {name} | {label} | {'yes' if compiled else 'no'} | "
                    f"{r['tokens_per_s']:.0f} | {peak / 1e9:.0f} | {r['mfu']:.0%} | "
                    f"{r['first_step_s']:.1f} |",
                    flush=True,
                )
    if models:
        print("\n| model | generation tokens/s, KV cache | recompute | speedup (256 new tokens) |")
        print("|---|---|---|---|")
    for name in models:
        g = generation_speed(name)
        results["generate"][name] = g
        print(f"| {name} | {g['cached']:.0f} | {g['recompute']:.0f} | {g['speedup']:.1f}x |")
    if ab is not None:
        faults = ab["faults_per_step"]
        print(
            f"\nCPU demo step (babygpt-tiny, vocab 2048, 32 x 128, fp32), glibc's default "
            f"allocator vs streamgpt.malloc: {ab['speedup_median']:.2f}x tokens/s (median of 3 "
            f"pairs); minor page faults per step {faults['default']:.0f} -> {faults['tuned']:.0f}"
        )
        results["allocator"] = ab
    if gelu is not None:
        print("\nfp32 GELU MLP, GELU recomputed in backward vs kept: tokens/s ratio, median of 10")
        print("alternating step pairs (range):")
        for name, r in gelu.items():
            lo, hi = r["ratios"][0], r["ratios"][-1]
            print(f"  {name} {r['speed_recompute_over_kept']:.3f} ({lo:.2f}-{hi:.2f})")
        results["gelu_recompute"] = gelu
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
