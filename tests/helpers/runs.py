"""`python train.py` run as a user runs it, in a subprocess: small configs, what to read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
# A model and stream small enough for tens of steps a minute on 2 CPU cores, every batch logged.
SMALL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.context=64",
    "data.stream.batch_size=8",
    "tokenizer.vocab_size=512",
    "data.stream.valid_size=16",
    "data.stream.streaming_setup_samples=200",
    "callbacks.samples.max_new_tokens=8",
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "logger=csv",
    "data.stream.log_batches=true",
]


def environment(**extra: str) -> dict[str, str]:
    """The caller's environment with W&B offline (no key), whatever the caller's shell says."""
    # Nor a token of the caller's shell: a test that wants one says so.
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "STREAMGPT_TOKEN")}
    return {**env, "WANDB_API_KEY": "", **extra}


def command(run: Path, *overrides: str, small: bool = True) -> list[str]:
    return [
        sys.executable,
        "train.py",
        f"hydra.run.dir={run}",
        *(SMALL if small else []),
        *overrides,
    ]


def train(
    run: Path,
    *overrides: str,
    timeout: float = 900,
    small: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(run, *overrides, small=small),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment(**(env or {})),
    )


def start(run: Path, *overrides: str, small: bool = True, **options) -> subprocess.Popen:
    """train.py in the background (its output in <run>.out)."""
    with open(f"{run}.out", "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command(run, *overrides, small=small),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment(**options.pop("env", {})),
            **options,
        )


def output(run: Path) -> str:
    return Path(f"{run}.out").read_text()


def batches(run: Path, rank: int = 0) -> dict[int, dict]:
    """A rank's batch log: per trained batch, its sample ids and a hash of its tokens."""
    path = run / f"batches-rank{rank}.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["batch"]: row for row in rows}


def wait_for(
    condition: Callable[[], object], proc: subprocess.Popen | None, what: str, timeout=300
):
    """Until `condition()`; fails if the run ended first or it takes longer than `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None:
            assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def processes_using(path: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def embedded_server(trainer: subprocess.Popen) -> psutil.Process | None:
    """The stream server a train.py process started, if it is running."""
    for child in psutil.Process(trainer.pid).children(recursive=True):
        try:
            if "streamgpt.server" in child.cmdline():  # python -m streamgpt.server
                return child
        except psutil.NoSuchProcess:
            continue
    return None
