"""The checkpoint to evaluate, the model rebuilt from it alone, and the figures it scores.

A run folder's checkpoint is `last.ckpt` by default (the weights the run ended with, which its
last validation scored), or with checkpoint=best the best by val/loss (checkpoints.run_checkpoint).
The model comes from the checkpoint's hyper_parameters and weights, the tokenizer from the run's
tokenizer.json; the packing (max_length, batch_size, limit_val_batches) from the run's
config_resolved.yaml when the run folder has one.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from streamgpt.bpb import bits_per_byte, token_nll_sums
from streamgpt.model import GPT

DEFAULT_EOS = "<|endoftext|>"


def run_folder(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: <run>/checkpoints/<file>, else the file's own folder."""
    folder = checkpoint.resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def run_settings(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """How the run packed and validated: from its config_resolved.yaml, else the defaults."""
    model = state["hyper_parameters"]["model"]
    eos = (state.get("tokenizer") or {}).get("eos_token") or DEFAULT_EOS
    settings = {
        "max_length": model["context"],
        "batch_size": 32,
        "limit_val_batches": 1.0,
        "precision": "32-true",
        "eos_token": eos,
        "server_eot": None,  # the run's server's end-of-document marker, when it is known
    }
    resolved = run_dir / "config_resolved.yaml"
    if resolved.is_file():
        cfg = OmegaConf.load(resolved)
        stream = cfg.data.stream
        settings |= {
            "max_length": stream.max_length,
            "batch_size": stream.batch_size,
            "limit_val_batches": cfg.trainer.limit_val_batches,
            "precision": cfg.trainer.precision,
            "eos_token": cfg.tokenizer.eos_token,
        }
        if not stream.url:  # the embedded server, whose config the run kept
            settings["server_eot"] = OmegaConf.select(cfg, "server.chunk.eot_marker")
    return settings


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Lightning's precisions as eval runs them: autocast for -mixed, the weights cast for -true.
DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


def precision_context(model: GPT, precision: str) -> contextlib.AbstractContextManager:
    """Run `model` as training's validation did under Lightning's `precision` (e.g. bf16-mixed)."""
    bits, _, kind = precision.partition("-")
    dtype = DTYPES[bits]
    device = next(model.parameters()).device
    if kind == "mixed":
        return torch.autocast(device.type, dtype=dtype)
    model.to(dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def score(
    model: GPT,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    precision: str = "32-true",
) -> dict[str, Any]:
    """Loss (mean NLL per target token, nats), perplexity, bits per byte and their counts."""
    device = next(model.parameters()).device
    byte_lengths = byte_lengths.to(device)
    sums = torch.zeros(4, dtype=torch.float64)
    sequences = 0
    with precision_context(model, precision):
        for x, y in batches:
            y = y.to(device)
            _, nll = model(x.to(device), y, reduction="none")  # chunked with model.loss_chunk
            sums += token_nll_sums(nll, y, byte_lengths).cpu()
            sequences += x.size(0)
    loss = (sums[0] / sums[1]).item()
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": bits_per_byte(sums[2].item(), sums[3].item()),
        "tokens": int(sums[1].item()),
        "bytes": int(sums[3].item()),
        "sequences": sequences,
    }
