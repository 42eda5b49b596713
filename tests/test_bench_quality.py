"""scripts/bench_quality.py's machinery, not its figures: two recipes with different tokenizers
trained for a short budget, each scored on the very same held-out bytes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers.runs import environment

REPO = Path(__file__).resolve().parents[1]
TINY = (
    "model.d_model=32 model.n_layers=1 model.n_heads=2 model.context=32 data.stream.batch_size=32"
    " data.stream.valid_size=16 callbacks.samples.max_new_tokens=8"
)


@pytest.mark.slow
def test_two_recipes_are_scored_on_the_same_held_out_bytes_with_finite_bits_per_byte(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "scripts/bench_quality.py",
            f"--recipe=bytes=tokenizer=bytes {TINY}",
            f"--recipe=bpe=tokenizer.vocab_size=400 data.stream.streaming_setup_samples=150 {TINY}",
            "--budgets=20",
            "--seeds=0",
            f"--out={tmp_path / 'runs'}",
            f"--json={results}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=environment(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(results.read_text())
    runs = {r["recipe"]: r for r in got["runs"]}
    assert set(runs) == {"bytes", "bpe"}
    for run in runs.values():
        assert math.isfinite(run["bpb"]) and 0 < run["bpb"] < 10, run
        assert run["stopped_by_budget"] and run["step"] >= 1
        assert run["samples"]["manual_0"].startswith("This movie is the most")
        assert 0 <= run["others_cpu_share"] <= 1
    # The held-out plays and poems whole, every byte scored, whatever the tokenizer.
    assert runs["bytes"]["eval_bytes"] == runs["bpe"]["eval_bytes"] > 100_000
    one_per_byte = runs["bytes"]["eval_bytes"] + runs["bytes"]["eval_documents"]  # + an eos each
    assert runs["bytes"]["eval_tokens"] == one_per_byte
    assert runs["bpe"]["eval_tokens"] < runs["bpe"]["eval_bytes"]
    ratios = {s["recipe"]: s["ratio_to_baseline"] for s in got["summary"]}
    assert ratios["bytes"] == 1.0 and ratios["bpe"] == pytest.approx(
        runs["bpe"]["bpb"] / runs["bytes"]["bpb"]
    )
    assert "| bytes | 20 |" in done.stdout and "| bpe | 20 |" in done.stdout
