"""A run folder used again (`resume=auto`, a requeued job, any rerun with the same hydra.run.dir)
keeps what made its first attempt: Hydra's files stay in `.hydra/`, attempt k's go to
`.hydra/attempt-<k>/` (with its config_resolved.yaml and environment.json), instead of Hydra
overwriting `.hydra/overrides.yaml` with the latest command. `record_run` writes those records.

Registered as a Hydra callback in conf/hydra/default.yaml; it runs before Hydra writes the files.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "tokenizers", "websockets", "wandb")


class KeepAttempts(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        first = Path(config.hydra.run.dir) / subdir
        if not (first / "overrides.yaml").exists():
            return
        k = 2
        while (first / f"attempt-{k}").exists():
            k += 1
        with open_dict(config.hydra):
            config.hydra.output_subdir = f"{subdir}/attempt-{k}"


def attempt_dir(run_dir: Path) -> Path:
    """Where this attempt's own records go: the run folder for the first, else its Hydra folder."""
    if not HydraConfig.initialized():
        return run_dir
    subdir = HydraConfig.get().output_subdir
    if subdir is None or not Path(subdir).name.startswith("attempt-"):
        return run_dir
    return run_dir / subdir


def overrides() -> list[str]:
    """This attempt's command-line overrides (none outside a Hydra app)."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def record_run(cfg: DictConfig, folder: Path) -> None:
    """Everything that made this attempt, beside its outputs: resolved config, versions, commit.
    `folder`: the run folder for a first attempt, its .hydra/attempt-<k>/ for later ones."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    versions = {}
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        versions[dist.metadata["Name"]] = dist.version
    info = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git": _git(),
        "key_packages": {p: versions.get(p) for p in PACKAGES},
        "packages": versions,
    }
    (folder / "environment.json").write_text(json.dumps(info, indent=2))


def _git() -> dict[str, Any]:
    """The commit of the code that ran: its checkout's, if it runs from one (not from a wheel)."""

    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
