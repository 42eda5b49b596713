"""An offline W&B run read back with W&B's own reader: `wandb leet inspect --json`, which prints
every record of a run's .wandb transaction log as one JSON object per line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of one offline run (its folder: <run>/wandb/offline-run-*)."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def of_type(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r[kind] for r in records(run_dir) if r.get("type") == kind]


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows logged to the run, in order (W&B's `_step` included)."""
    return [h["item"] for h in of_type(run_dir, "history")]


def config_updates(run_dir: Path) -> list[dict[str, Any]]:
    """Each config update the run sent, in order, keys starting with `_` (W&B's own) left out."""
    updates = []
    for record in records(run_dir):
        kind = record.get("type")
        body = record.get("run", {}).get("config") if kind == "run" else record.get("config")
        if kind in ("run", "config") and body:
            mine = {k: v for k, v in body.get("update", {}).items() if not k.startswith("_")}
            if mine:
                updates.append(mine)
    return updates


def summary(run_dir: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for record in of_type(run_dir, "summary"):
        merged.update(record.get("update", {}))
    return merged


def run_info(run_dir: Path) -> dict[str, Any]:
    """The run record: run_id, display_name, run_group, ..."""
    return of_type(run_dir, "run")[0]
