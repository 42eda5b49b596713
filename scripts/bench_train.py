"""Training and generation speed on this machine, as ratios measured in one run (`make bench`).

For each model config (babygpt-tiny, streaming_tutorial, babygpt) in fp32 and bf16-mixed, eager
and torch.compile'd: training tokens/s (forward, backward, AdamW step on batches already in
memory) and MFU against the matmul peak of the same dtype measured in this run. Then generation
tokens/s for 256 new tokens with and without the KV cache.

    python scripts/bench_train.py [--models babygpt-tiny,babygpt] [--seconds 6] [--no-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import yaml

from streamgpt.model import GPT, GPTConfig
from streamgpt.optim import OptimizerConfig, build_optimizer
from streamgpt.perf import matmul_flops

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
VOCAB = 8192
# Sequences per step: the demo's batch for the tiny model; smaller than the tutorials' for the
# larger ones, so a CPU step takes seconds, not minutes (MFU hardly depends on it).
BATCH = {"babygpt-tiny": 32, "streaming_tutorial": 64, "babygpt": 4, "gpt2-small": 1}


def load_config(name: str) -> GPTConfig:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg.pop("compile")
    cfg["vocab_size"] = cfg["vocab_size"] or VOCAB
    cfg["dropout"] = 0.0
    return GPTConfig(**cfg)


def train_speed(name: str, dtype: torch.dtype, compiled: bool, seconds: float) -> dict:
    torch.manual_seed(0)
    cfg = load_config(name)
    model = GPT(cfg)
    step_fn = torch.compile(model) if compiled else model
    optimizer = build_optimizer(model, OptimizerConfig(), "cpu")
    batch = BATCH[name]
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.context))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
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
    warmup = time.perf_counter() - started
    step()
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - started
    tokens_per_s = steps * batch * cfg.context / elapsed
    return {
        "tokens_per_s": tokens_per_s,
        "flops_per_s": tokens_per_s * model.flops_per_token(),
        "first_step_s": warmup,
        "batch": [batch, cfg.context],
        "params": model.num_params(),
    }


def generation_speed(name: str, new_tokens: int = 256) -> dict:
    torch.manual_seed(0)
    cfg = load_config(name)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (16,)).tolist()
    rates = {}
    for use_cache in (True, False):
        started = time.perf_counter()
        out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        rates["cached" if use_cache else "recompute"] = len(out) / (time.perf_counter() - started)
    rates["speedup"] = rates["cached"] / rates["recompute"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="babygpt-tiny,streaming_tutorial,babygpt")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")

    # This machine's speed drifts by 2x over minutes (a shared host), so each setting's MFU is
    # taken against the matmul peak of its dtype measured right before and right after it.
    results: dict = {"threads": torch.get_num_threads(), "train": [], "generate": {}}
    print(f"{torch.get_num_threads()} threads")
    print("\n| model | precision | compile | tokens/s | matmul peak GFLOP/s | MFU | first step s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for dtype, label in ((torch.float32, "32-true"), (torch.bfloat16, "bf16-mixed")):
            for compiled in (False,) if args.no_compile else (False, True):
                before = matmul_flops("cpu", dtype)
                r = train_speed(name, dtype, compiled, args.seconds)
                peak = (before + matmul_flops("cpu", dtype)) / 2
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
    print("\n| model | generation tokens/s, KV cache | recompute | speedup (256 new tokens) |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        g = generation_speed(name)
        results["generate"][name] = g
        print(f"| {name} | {g['cached']:.0f} | {g['recompute']:.0f} | {g['speedup']:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
