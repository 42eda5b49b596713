"""Start-up time and peak memory of real `python train.py` runs (`make bench`).

Start-up: the CPU demo as `make train` runs it (embedded server, BPE trained on the stream, W&B
offline), timed from process start to the first optimizer step, phase by phase, from the run's
perf.json (written by monitors.PerfReport); the median of `--runs` runs, then once with
model.compile=true (its compile time is the first step minus the second).

Memory: peak RSS (Linux VmHWM) of the trainer and of the embedded server over a run that trains,
validates, samples and checkpoints once: the CPU demo and `model=babygpt` (batch 32 x 512).

    python scripts/bench_startup.py [--runs 3] [--skip-babygpt]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONCE = ["trainer.val_every={n}", "callbacks.sample_every={n}", "callbacks.checkpoint_every={n}"]


def train(run_dir: Path, *overrides: str) -> dict:
    done = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_API_KEY": ""},
    )
    if done.returncode != 0:
        raise SystemExit(f"train.py {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "perf.json").read_text())


def once(n: int) -> list[str]:
    return [f"trainer.max_steps={n}", *(o.format(n=n) for o in ONCE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-babygpt", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        runs = [train(Path(tmp) / f"demo{i}", "trainer.max_steps=2") for i in range(args.runs)]
        compiled = train(Path(tmp) / "compiled", "trainer.max_steps=2", "model.compile=true")
        memory = {"demo": train(Path(tmp) / "mem-demo", *once(100))["peak_rss_mb"]}
        if not args.skip_babygpt:
            memory["babygpt"] = train(Path(tmp) / "mem-babygpt", "model=babygpt", *once(2))[
                "peak_rss_mb"
            ]
    startups = [r["startup"] for r in runs]
    phases = {
        k: statistics.median(s["phases_s"][k] for s in startups) for k in startups[0]["phases_s"]
    }
    total = statistics.median(s["to_first_step_s"] for s in startups)
    results = {"runs": startups, "compiled": compiled["startup"], "peak_rss_mb": memory}

    print(f"\nCPU demo, median of {args.runs} runs: {total:.1f} s to the first optimizer step\n")
    print("| phase | s |")
    print("|---|---|")
    for phase, seconds in phases.items():
        print(f"| {phase} | {seconds:.1f} |")
    background = startups[len(startups) // 2]["background_ready_s"]
    for work, at in background.items():
        print(f"| (background) {work} ready at | {at:.1f} |")
    c = compiled["startup"]["phases_s"]
    first = next(v for k, v in c.items() if k.startswith("first step"))
    print(
        f"\nmodel.compile=true: {compiled['startup']['to_first_step_s']:.1f} s to the first step; "
        f"compile ~{first - c['second step']:.1f} s (first step {first:.1f} s, second "
        f"{c['second step']:.1f} s)"
    )
    print("\n| run | trainer peak RSS MB | server peak RSS MB |")
    print("|---|---|---|")
    for name, m in memory.items():
        print(f"| {name} | {m['trainer']:.0f} | {m.get('server', 0):.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
