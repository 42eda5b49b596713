"""One evaluation: checkpoint -> model and tokenizer -> text -> figures -> eval.json and W&B.

eval.json goes beside the checkpoint (written whole or not at all). With logger=wandb the figures
also go to a new W&B run (job_type `eval`) in the group of the run that trained the checkpoint
(its W&B identity is in the checkpoint), so they sit beside its training curves.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from streamgpt.atomic import write_atomic
from streamgpt.bpb import token_byte_lengths
from streamgpt.checkpoints import load_gpt, run_checkpoint
from streamgpt.config import WANDB_LOGGER
from streamgpt.data import tokenizer as tokenizers
from streamgpt.evaluation import texts
from streamgpt.evaluation.figures import (
    device_of,
    run_folder,
    run_settings,
    score,
)

log = logging.getLogger("streamgpt")
FIGURES = ("loss", "ppl", "bpb", "tokens", "bytes", "sequences")


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on the text `cfg.data` names; returns what eval.json holds."""
    checkpoint = run_checkpoint(cfg.ckpt_path, cfg.checkpoint)
    log.info("evaluating %s", checkpoint)
    model, state = load_gpt(checkpoint, device_of(cfg.device))
    run_dir = run_folder(checkpoint)
    run = run_settings(run_dir, state)
    run["max_length"] = cfg.max_length or run["max_length"]
    run["batch_size"] = cfg.batch_size or run["batch_size"]
    context = state["hyper_parameters"]["model"]["context"]
    if run["max_length"] > context:
        raise ValueError(f"max_length={run['max_length']} exceeds the model's context ({context})")
    tokenizer_path = Path(cfg.tokenizer_path or run_dir / "tokenizer.json")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {tokenizer_path}: give the run's with tokenizer_path=<tokenizer.json>"
        )
    tokenizer = tokenizers.load(tokenizer_path, run["eos_token"])
    windows = read_text(cfg, run_dir, tokenizer, run)
    precision = cfg.trainer.precision or run["precision"]
    figures = score(model, windows.batches, token_byte_lengths(tokenizer), precision)
    record = {
        "checkpoint": str(checkpoint),
        "step": state.get("global_step"),
        "tokenizer": str(tokenizer_path),
        "data": windows.source,
        "max_length": run["max_length"],
        "batch_size": run["batch_size"],
        "precision": precision,
        **figures,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = checkpoint.parent / "eval.json"
    write_atomic(out, json.dumps(record, indent=2) + "\n")  # first: W&B failing loses nothing
    wandb_cfg = next((c for c in cfg.logger.values() if c._target_ == WANDB_LOGGER), None)
    if wandb_cfg is not None:
        record["wandb"] = log_to_wandb(wandb_cfg, record, out_dir)
        write_atomic(out, json.dumps(record, indent=2) + "\n")
    log.info("figures written to %s", out)
    return record


def read_text(cfg: DictConfig, run_dir: Path, tokenizer, run: dict[str, Any]) -> texts.Windows:
    data, eos = cfg.data, run["eos_token"]
    if data.files is not None:
        return texts.from_files(data, tokenizer, eos, run["max_length"], run["batch_size"])
    if data.url is not None:
        return texts.from_stream(data, tokenizer, eos, run["max_length"], run["batch_size"])
    server_eot = run["server_eot"] or data.eot_marker
    return texts.held_out(run_dir, tokenizer, eos, server_eot, run)


def log_to_wandb(cfg: DictConfig, record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """A W&B run of job_type `eval` in the group of the run that trained the checkpoint
    (`cfg`: the W&B entry of the logger group: project, entity, tags, mode)."""
    import wandb

    from streamgpt.loggers import checkpoint_identity

    trained = checkpoint_identity(record["checkpoint"])
    mode = cfg.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    name = trained.get("name") or Path(record["checkpoint"]).parent.parent.name
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=trained.get("group") or "eval",
        job_type="eval",
        name=f"eval {name}",
        tags=list(cfg.tags),
        config={k: v for k, v in record.items() if k not in FIGURES} | {"trained_run": trained},
        dir=str(out_dir),
        mode=mode,
    )
    try:
        step = record["step"] or 0
        run.log({f"eval/{k}": record[k] for k in FIGURES}, step=step)
        where = {"id": run.id, "group": run.group, "dir": str(Path(run.dir).parent)}
    finally:
        wandb.finish()
    return where
