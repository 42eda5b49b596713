"""Checkpoint files: which one a run resumes from, checked before use. Lightning-free, so the run's
setup (headstart.py) decides it before Lightning is imported; checkpoint_io.py writes them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from streamgpt.model import GPT, GPTConfig

log = logging.getLogger("streamgpt")


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


def find_checkpoint(ckpt_path: str | None, resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint this run continues from: `ckpt_path`, or with resume=auto the newest intact
    one of the run folder; None for a fresh start."""
    if ckpt_path:
        problem = readable(Path(ckpt_path))
        if problem:
            raise ValueError(f"ckpt_path={ckpt_path} cannot be resumed from: {problem}")
        return str(ckpt_path)
    if resume == "auto":
        path = newest_intact(run_dir / "checkpoints")
        if path is None:
            log.info(
                "resume=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints"
            )
            return None
        log.info("resume=auto: continuing from %s", path)
        return str(path)
    return None


def adopt_run_files(checkpoint: str, run_dir: Path) -> None:
    """Resuming another run's checkpoint here: take its tokenizer and validation set too."""
    source = Path(checkpoint).resolve().parent.parent
    if source == run_dir.resolve():
        return
    for name in ("tokenizer.json", "validation.jsonl"):
        if (source / name).exists() and not (run_dir / name).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / name, run_dir / name)


# -- a trained run's checkpoint, for the tools after training (eval, export, generate) ----------

WHICH = ("last", "best")


def run_checkpoint(path: str | Path, which: str = "last") -> Path:
    """The checkpoint a path names, checked: a .ckpt file as given; in a run folder (or its
    checkpoints/) `last.ckpt` (what the run ended with) or, with which='best', the lowest val/loss
    in a file name (step=...-val_loss=....ckpt; last.ckpt when the run had no validation).
    FileNotFoundError when there is none, ValueError when it is truncated or not a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        ranked = sorted(
            folder.glob("step=*-val_loss=*.ckpt"), key=lambda p: float(p.stem.split("=")[-1])
        )
        newest = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if which == "best" and ranked:
            path = ranked[0]
        elif (folder / "last.ckpt").is_file():
            path = folder / "last.ckpt"
        elif newest:
            path = newest[-1]
        else:
            raise FileNotFoundError(
                f"{folder} has no checkpoints (*.ckpt): train the run further, or give a .ckpt"
            )
    problem = readable(path)
    if problem:
        raise ValueError(f"{problem}; pick another checkpoint of the run (or its last.ckpt)")
    return path


def load_gpt(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The GPT of a checkpoint (its hyper_parameters and weights, nothing else), in eval mode,
    and the checkpoint's state (global_step, tokenizer, W&B identity, ...)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**state["hyper_parameters"]["model"]))
    weights = state["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.to(device).eval(), state
