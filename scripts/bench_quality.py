"""Quality at fixed wall-clock budgets: held-out bits per byte of recipes trained for the same time.

A recipe is a set of train.py overrides. For each budget and seed, every recipe trains in a fresh
`python train.py ... trainer.budget_s=<budget> seed=<seed>` (the budget counts from the process's
start: imports, embedded server and tokenizer included; the lr schedule anneals over it), one
after another, the order alternating across seeds so drift hits every recipe alike. The budget is
the only limit (trainer.max_steps is lifted far away), metrics go to CSV (no W&B), nothing else of
this script runs meanwhile. Then each run's last.ckpt is scored by eval.py, outside the budget, on
the same text for every recipe: one epoch of the embedded corpus's validation split (its held-out
plays and poems, whole documents, every byte scored), served by one stream server started for the
scoring. Bits per byte do not depend on the tokenizer, so byte-level and BPE recipes compare. A
recipe that changes server.source trains on other text but is still scored on this one.

Prints a markdown table, recipe x budget: median bits per byte, min-max over seeds, ratio to the
baseline's median, steps, tokens/s from the first step to the last (validation and samples
included), start-up s (process start to training), and the most CPU other processes took during
one of its runs (this machine may be shared: a busy core slows a run that expects two). With
--json, every run (with its last samples, from the fixed prompts and unconditional) and the
summary. Run folders stay in --out.

    python scripts/bench_quality.py [--recipe NAME='overrides' ...] [--budgets 60,120,300]
        [--seeds 0,1,2] [--baseline nanogpt] [--out DIR] [--json results.json]

Defaults: --recipe nanogpt='experiment=nanogpt_cpu' (nanoGPT's CPU recipe with our code: the
in-house baseline) --recipe demo='' (the CPU demo `make train` runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamgpt.server.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"nanogpt": "experiment=nanogpt_cpu", "demo": ""}
# Every run: the budget as the only limit, metrics to CSV, no progress bar to draw.
COMMON = ["trainer.max_steps=1000000000", "logger=csv", "trainer.progress_bar=false"]


def parse_recipes(given: list[str] | None) -> dict[str, list[str]]:
    recipes = {}
    for item in given or [f"{k}={v}" for k, v in RECIPES.items()]:
        name, sep, overrides = item.partition("=")
        if not sep or not name or name in recipes:
            raise SystemExit(f"--recipe {item!r}: give NAME='overrides' with a new NAME each time")
        recipes[name] = shlex.split(overrides)
    return recipes


def run_py(args: list[str], timeout: float, **extra: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env |= {"WANDB_MODE": "offline", **extra}  # no W&B network, whatever a recipe's logger
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(f"{shlex.join(args)} failed (exit {done.returncode}):\n{tail}")


def cpu_s() -> tuple[float, float, float]:
    """(wall s, CPU s every process of the machine used, CPU s this one's finished children
    used): what else ran during a run. Linux's /proc/stat; NaN elsewhere."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
    except OSError:
        busy = math.nan
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time(), busy, children.ru_utime + children.ru_stime


def train(run: Path, overrides: list[str], budget: float, seed: int) -> float:
    """One run; returns the share of the machine's CPU that other processes used meanwhile."""
    options = [*COMMON, *overrides, f"trainer.budget_s={budget}", f"seed={seed}"]
    before = cpu_s()
    run_py(["train.py", f"hydra.run.dir={run}", *options], timeout=budget + 900)
    wall, busy, ours = (b - a for a, b in zip(before, cpu_s(), strict=True))
    return max(0.0, busy - ours) / (wall * (os.cpu_count() or 1))


def score(run: Path, url: str, out: Path) -> dict:
    """eval.py on one epoch of the server's validation split; its eval.json."""
    args = ["eval.py", f"ckpt_path={run}", f"data.url={url}", "data.split=validation"]
    args += ["logger=none", f"hydra.run.dir={out / 'eval' / run.name}"]
    # One thread: scoring is outside the budget, and on a busy machine two threads wait on
    # each other far longer than one computes.
    run_py(args, timeout=3600, OMP_NUM_THREADS="1")
    return json.loads((run / "checkpoints" / "eval.json").read_text())


def samples(run: Path, step: int) -> dict[str, str]:
    """The run's last samples: its fixed prompts' continuations and unconditional ones."""
    folder = run / "samples" / f"iter_{step}"
    return {p.stem: p.read_text() for p in sorted(folder.glob("*.txt"))}


def record(run: Path, recipe: str, budget: float, seed: int, others: float, figures: dict) -> dict:
    ran = json.loads((run / "budget.json").read_text())
    training_s = ran["last_step_s"] - ran["train_start_s"]
    return {
        "recipe": recipe,
        "budget_s": budget,
        "seed": seed,
        "bpb": figures["bpb"],
        "loss": figures["loss"],
        "eval_bytes": figures["bytes"],
        "eval_tokens": figures["tokens"],
        "eval_documents": figures["data"]["documents"],
        "step": ran["step"],
        "stopped_by_budget": ran["stopped_by_budget"],
        "tokens": ran["tokens"],
        "tokens_per_s": ran["tokens"] / training_s if training_s > 0 else math.nan,
        "startup_s": ran["train_start_s"],
        "others_cpu_share": others,  # of the machine's CPU, used by other processes meanwhile
        "run": str(run),
        "samples": samples(run, ran["step"]),
    }


def summarize(rows: list[dict], baseline: str) -> list[dict]:
    """Per recipe and budget: median, min and max bits per byte over seeds, and the rest."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["recipe"], row["budget_s"]), []).append(row)
    summary = []
    for (recipe, budget), runs in groups.items():
        bpbs = [r["bpb"] for r in runs]
        summary.append(
            {
                "recipe": recipe,
                "budget_s": budget,
                "bpb_median": statistics.median(bpbs),
                "bpb_min": min(bpbs),
                "bpb_max": max(bpbs),
                "steps": statistics.median(r["step"] for r in runs),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "startup_s": statistics.median(r["startup_s"] for r in runs),
                "others_cpu_share": max(r["others_cpu_share"] for r in runs),
                "seeds": len(runs),
            }
        )
    base = {s["budget_s"]: s["bpb_median"] for s in summary if s["recipe"] == baseline}
    for s in summary:
        s["ratio_to_baseline"] = s["bpb_median"] / base[s["budget_s"]] if base else math.nan
    return summary


def table(summary: list[dict], baseline: str) -> str:
    lines = [
        f"| recipe | budget s | bpb (median) | min-max | / {baseline} | steps | tokens/s "
        "| start-up s | others' CPU | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(summary, key=lambda s: (s["budget_s"], s["recipe"] != baseline)):
        lines.append(
            f"| {s['recipe']} | {s['budget_s']:g} | {s['bpb_median']:.4f} | "
            f"{s['bpb_min']:.4f}-{s['bpb_max']:.4f} | {s['ratio_to_baseline']:.3f} | "
            f"{s['steps']:.0f} | {s['tokens_per_s']:.0f} | {s['startup_s']:.1f} | "
            f"{s['others_cpu_share']:.0%} | {s['seeds']} |"
        )
    return "\n".join(lines)


def train_all(recipes: dict, budgets: list[float], seeds: list[int], out: Path) -> list[tuple]:
    """Every (recipe, budget, seed) run, one at a time; the order alternates across seeds."""
    runs = []
    for budget in budgets:
        for i, seed in enumerate(seeds):
            for name in list(recipes) if i % 2 == 0 else list(recipes)[::-1]:
                run = out / f"b{budget:g}_s{seed}_{name}"
                print(f"training {name} for {budget:g} s, seed {seed} -> {run}", flush=True)
                others = train(run, recipes[name], budget, seed)
                runs.append((run, name, budget, seed, others))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", help="NAME='train.py overrides' (repeat)")
    parser.add_argument("--budgets", default="60,120,300", help="seconds from process start")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--baseline", help="the recipe the others are compared to (the first)")
    parser.add_argument("--out", type=Path, help="run folders (default: a new temporary one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    recipes = parse_recipes(args.recipe)
    baseline = args.baseline or next(iter(recipes))
    if baseline not in recipes:
        raise SystemExit(f"--baseline {baseline}: not one of the recipes {list(recipes)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-quality-"))
    out.mkdir(parents=True, exist_ok=True)

    runs = train_all(recipes, budgets, seeds, out)
    with ServerProcess([f"hydra.run.dir={out / 'eval_server'}"]) as server:
        rows = [record(run, *rest, score(run, server.url, out)) for run, *rest in runs]
    held_out = {(r["eval_documents"], r["eval_bytes"]) for r in rows}
    summary = summarize(rows, baseline)

    print("\nrecipes (train.py overrides; every run also: " + " ".join(COMMON) + "):")
    for name, overrides in recipes.items():
        print(f"  {name}: {shlex.join(overrides) or '(none: the CPU demo)'}")
    documents, n_bytes = sorted(held_out)[0]
    same = "the same for every run" if len(held_out) == 1 else f"NOT the same: {held_out}"
    print(
        f"scored on the embedded corpus's validation split: {documents} documents, "
        f"{n_bytes:,} bytes ({same})\n"
    )
    print(table(summary, baseline))
    late = [f"{r['recipe']} {r['budget_s']:g} s seed {r['seed']}" for r in rows]
    late = [run for run, r in zip(late, rows, strict=True) if not r["stopped_by_budget"]]
    if late:
        print(f"\nnot stopped by the budget (max_steps or the stream's end): {', '.join(late)}")
    print(f"\nrun folders: {out}")
    if args.json:
        results = {"recipes": recipes, "common": COMMON, "runs": rows, "summary": summary}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
