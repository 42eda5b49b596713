"""The user's cache folder: the embedded corpus (server) and measured matmul peaks (trainer)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$STREAMGPT_CACHE`, else `$XDG_CACHE_HOME/streamgpt`, else `~/.cache/streamgpt`."""
    if os.environ.get("STREAMGPT_CACHE"):
        return Path(os.environ["STREAMGPT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamgpt"
