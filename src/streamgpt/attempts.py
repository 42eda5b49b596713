"""A run folder used again (`resume=auto`, a requeued job, any rerun with the same hydra.run.dir)
keeps what made its first attempt: Hydra's files stay in `.hydra/`, attempt k's go to
`.hydra/attempt-<k>/` (with its config_resolved.yaml and environment.json), instead of Hydra
overwriting `.hydra/overrides.yaml` with the latest command.

Registered as a Hydra callback in conf/hydra/default.yaml; it runs before Hydra writes the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict


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
