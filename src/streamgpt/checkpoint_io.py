"""Lightning's checkpoint writer, made atomic."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from streamgpt.atomic import replacing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, syncs it, then renames it into place: a crash
    (or a SIGKILL) mid-write leaves the previous file intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with replacing(path, sync=True) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
