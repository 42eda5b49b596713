"""Checkpoint files: written atomically, found for `resume=auto`, checked before use."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from streamgpt.atomic import replacing

log = logging.getLogger("streamgpt")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, syncs it, then renames it into place: a crash
    (or a SIGKILL) mid-write leaves the previous file intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with replacing(path, sync=True) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def readable(path: Path) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return f"{path} does not exist"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, not a checkpoint at all
        return f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]})"
    missing = [k for k in ("state_dict", "global_step") if k not in state]
    if missing:
        return f"{path} is not a training checkpoint (no {', '.join(missing)})"
    return None


def newest_intact(folder: Path) -> Path | None:
    """The most recently written checkpoint in `folder` that loads; broken ones are reported."""
    candidates = sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        problem = readable(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint: %s", problem)
    return None
