"""Peak memory and speed of a training step with the loss from full logits and chunked
(model.loss_chunk, losses.py), for experiment=streaming_tutorial's shapes: batch 256 x 64,
vocabulary 8192, the streaming_tutorial model as its config file has it, dropout 0.1 included
(the model then trains with attention.py's attention, dropout.py's masks).

Step: each variant in a fresh process with the tutorial's allocator setting (trainer.malloc, as
train.py sets it: streamgpt.malloc), a warm-up step then `--steps` timed ones (forward, backward,
AdamW); peak RSS (VmHWM) after building the model and optimizer and after the steps, and tokens/s.
The variants (full logits, the chunked loss, and the chunked loss with the other trainer.malloc
setting) alternate, `--pairs` times, and are compared with the full logits by the median of their
ratios within a pair (this machine's speed drifts).

Trainer: with --train-py, also `python train.py experiment=streaming_tutorial` for a few steps
(with one validation, sample and checkpoint) per variant, its trainer's peak RSS from perf.json.

    python scripts/bench_memory.py [--pairs 3] [--steps 4] [--precision bf16-mixed] [--train-py]
        [--dropout 0.0]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL, VOCAB, BATCH, CHUNK = "streaming_tutorial", 8192, 256, 2048
EXPERIMENT = yaml.safe_load((REPO / "conf" / "experiment" / f"{MODEL}.yaml").read_text())
MALLOC = EXPERIMENT["trainer"]["malloc"]  # the tutorial's trainer.malloc


def step_child(
    loss_chunk: int, malloc: str, steps: int, precision: str, dropout: float | None
) -> dict:
    """One variant, in this (fresh) process."""
    import torch

    from streamgpt.malloc import allocator
    from streamgpt.optim import OptimizerConfig, build_optimizer
    from streamgpt.perf import peak_rss_mb

    sys.path.insert(0, str(REPO / "scripts"))
    from bench_train import load_config

    allocator(malloc)
    from streamgpt.model import GPT

    torch.manual_seed(0)
    config_file = yaml.safe_load((REPO / "conf" / "model" / f"{MODEL}.yaml").read_text())
    dropout = config_file["dropout"] if dropout is None else dropout
    # bench_train.load_config sets dropout 0; here the config's own (or --dropout).
    cfg = dataclasses.replace(load_config(MODEL, VOCAB), loss_chunk=loss_chunk, dropout=dropout)
    model = GPT(cfg)
    optimizer = build_optimizer(model, OptimizerConfig(), "cpu")
    x = torch.randint(0, cfg.vocab_size, (BATCH, cfg.context))
    y = torch.randint(0, cfg.vocab_size, (BATCH, cfg.context))
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )

    def step() -> float:
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    built = peak_rss_mb()
    first_loss = step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    return {
        "loss_chunk": loss_chunk,
        "malloc": malloc,
        "built_rss_mb": built,
        "peak_rss_mb": peak_rss_mb(),
        "tokens_per_s": steps * BATCH * cfg.context / elapsed,
        "first_loss": first_loss,
        "dropout": dropout,
    }


def run_step_child(loss_chunk: int, malloc: str, args: argparse.Namespace) -> dict:
    args = [
        *("--child", f"{loss_chunk}:{malloc}", "--steps", str(args.steps)),
        *("--precision", args.precision),
        *(("--dropout", str(args.dropout)) if args.dropout is not None else ()),
    ]
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_py(run_dir: Path, loss_chunk: int, malloc: str, steps: int = 5) -> float:
    """Trainer peak RSS (MB) of a short real run of the tutorial."""
    overrides = [f"trainer.max_steps={steps}", f"model.loss_chunk={loss_chunk}"]
    overrides += [f"trainer.malloc={malloc}"]
    overrides += [f"{k}={steps}" for k in ("trainer.val_every", "callbacks.sample_every")]
    overrides += [f"callbacks.checkpoint_every={steps}", "logger=none"]
    command = [sys.executable, "train.py", "experiment=streaming_tutorial"]
    done = subprocess.run(
        [*command, f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_API_KEY": "", "PYTHONPATH": str(REPO / "src")},
    )
    if done.returncode != 0:
        raise SystemExit(f"train.py failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "perf.json").read_text())["peak_rss_mb"]["trainer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="model.loss_chunk to compare")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--train-py", action="store_true")
    parser.add_argument("--dropout", type=float, help="model.dropout (default: the model config's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        chunk, malloc = args.child.split(":")
        print(json.dumps(step_child(int(chunk), malloc, args.steps, args.precision, args.dropout)))
        return

    other = "speed" if MALLOC == "memory" else "memory"
    variants = [(0, MALLOC), (args.chunk, MALLOC), (args.chunk, other)]
    names = [f"loss_chunk={c}, trainer.malloc={m}" for c, m in variants]
    rows = []
    dropout = "the config's dropout" if args.dropout is None else f"dropout {args.dropout}"
    print(f"{MODEL}, batch {BATCH} x 64, vocabulary {VOCAB}, {dropout}, {args.precision}, CPU\n")
    print("| pair | variant | peak RSS MB | after build MB | tokens/s | first loss |")
    print("|---|---|---|---|---|---|")
    for pair in range(args.pairs):
        row = {}
        for i in range(len(variants)) if pair % 2 == 0 else reversed(range(len(variants))):
            r = row[i] = run_step_child(*variants[i], args)
            print(
                f"| {pair} | {names[i]} | {r['peak_rss_mb']:.0f} | {r['built_rss_mb']:.0f} | "
                f"{r['tokens_per_s']:.0f} | {r['first_loss']:.4f} |",
                flush=True,
            )
        rows.append(row)
    print()
    summary = []
    for i, name in enumerate(names):
        speed = statistics.median(r[i]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rows)
        peak = statistics.median(r[i]["peak_rss_mb"] for r in rows)
        summary.append({"variant": name, "peak_rss_mb": peak, "speed_vs_full_logits": speed})
        print(
            f"{name}: median peak RSS {peak:.0f} MB, tokens/s / full logits' {speed:.3f} "
            f"(median of {args.pairs} pairs)"
        )
    results = {"steps": [{names[i]: r[i] for i in r} for r in rows], "summary": summary}
    if args.train_py:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            trainer = {
                names[i]: train_py(Path(tmp) / f"variant{i}", *variants[i])
                for i in range(len(variants))
            }
        print("\ntrain.py experiment=streaming_tutorial, 5 steps: trainer peak RSS")
        for name, peak in trainer.items():
            print(f"  {name}: {peak:.0f} MB")
        results["train_py_peak_rss_mb"] = trainer
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
