"""`model.init_from=<folder>`: a GPT-2-shaped model starts from a local Hugging Face GPT-2 folder
(config.json and weights, as save_pretrained writes them), to fine-tune on a stream.

Checked at the edge (config.validate: check_init_from), loaded by GPTModule for a fresh run only
(run.py: a resume takes its weights from the checkpoint). The folder's token rows fill the first
rows of our embedding; our padding rows keep their init. Only safetensors (or torch) is needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from streamgpt.hf import SHAPES, gpt2_modules
from streamgpt.model import GPT

log = logging.getLogger("streamgpt")

GPT2_DEFAULTS = {"n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
# GPT-2's size, ours, for the error that says which overrides fit the folder.
GPT2_SIZES = {
    "n_embd": "d_model",
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "n_positions": "context",
}


def read_gpt2_config(folder: str | Path) -> dict[str, Any]:
    """A local GPT-2 folder's config.json (as save_pretrained writes it); refused if it is not."""
    where = f"model.init_from={folder}"
    if not Path(folder).is_dir():
        raise ValueError(f"{where}: no such folder")
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ValueError(
            f"{where}: no config.json (a folder as transformers' save_pretrained writes)"
        )
    hf = json.loads(config.read_text())
    if hf.get("model_type") != "gpt2":
        raise ValueError(
            f"{where} holds a {hf.get('model_type')!r} model; only GPT-2 (model_type gpt2) imports"
        )
    return {**GPT2_DEFAULTS, **hf}


def check_init_from(model: Any) -> None:
    """model.init_from fits the model config (`model`: the config's model group); else one line
    naming what differs and the overrides that fix it."""
    hf = read_gpt2_config(model.init_from)
    where = f"model.init_from={model.init_from}"
    shape = {**SHAPES["gpt2"], "bias": True, "qk_norm": False}
    wrong = {k: v for k, v in shape.items() if model[k] != v}
    if wrong:
        raise ValueError(
            f"{where} is GPT-2: the model must be GPT-2-shaped, set "
            + " ".join(f"model.{k}={str(v).lower()}" for k, v in wrong.items())
        )
    fixes = {ours: hf[theirs] for theirs, ours in GPT2_SIZES.items() if hf[theirs] != model[ours]}
    inner = hf.get("n_inner") or 4 * hf["n_embd"]
    if round(model.mlp_ratio * hf["n_embd"]) != inner:
        fixes["mlp_ratio"] = inner / hf["n_embd"]
    if fixes:
        raise ValueError(
            f"{where} does not fit the model config: "
            + ", ".join(f"model.{k}={model[k]} but the folder's is {v}" for k, v in fixes.items())
            + "; set "
            + " ".join(f"model.{k}={v:g}" for k, v in fixes.items())
        )
    if model.vocab_size is not None and model.vocab_size < hf["vocab_size"]:
        raise ValueError(
            f"{where} has {hf['vocab_size']} token rows, more than model.vocab_size="
            f"{model.vocab_size}; set model.vocab_size={-(-hf['vocab_size'] // 64) * 64}"
        )
    unsupported = {
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (
            hf.get("scale_attn_by_inverse_layer_idx", False),
            False,
        ),
    }
    odd = [f"{k}={v}" for k, (v, ours) in unsupported.items() if v != ours]
    if odd:
        raise ValueError(f"{where} computes what our GPT does not ({', '.join(odd)})")
    activation = hf.get("activation_function", "gelu_new")
    if not activation.startswith("gelu"):
        raise ValueError(f"{where} uses activation_function={activation}; our MLP is GELU")
    if activation != "gelu":
        log.warning(
            "%s uses activation_function=%s; our MLP uses the exact (erf) GELU, so its outputs "
            "start slightly off the folder's model (GELU's tanh approximation differs by < 1e-3) "
            "until fine-tuning adapts",
            where,
            activation,
        )


def gpt2_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a GPT-2 folder (model.safetensors, its shards, or pytorch_model.bin), named
    as GPT2Model names them (no `transformer.` prefix)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        state = load_file(folder / "model.safetensors")
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"model.init_from={folder}: no model.safetensors(.index.json) or pytorch_model.bin"
        )
    return {k.removeprefix("transformer."): v.float() for k, v in state.items()}


def init_from_gpt2(model: GPT, folder: str | Path) -> None:
    """Load a GPT-2 folder's weights into `model` (checked by check_init_from): its token rows
    into the first rows of our embedding; rows beyond its vocabulary keep their init."""
    folder = Path(folder)
    theirs = gpt2_state_dict(folder)
    wte = theirs["wte.weight"]
    if wte.shape[0] > model.cfg.vocab_size:
        raise ValueError(
            f"model.init_from={folder} has {wte.shape[0]} token rows, more than the model's "
            f"{model.cfg.vocab_size}; set model.vocab_size={-(-wte.shape[0] // 64) * 64}"
        )
    embedding = model.tok_emb.weight.detach().clone()
    embedding[: wte.shape[0]] = wte
    state = {
        "tok_emb.weight": embedding,
        "head.weight": embedding,
        "pos_emb.weight": theirs["wpe.weight"],
    }
    for name, ours, conv in gpt2_modules(model.cfg.n_layers):
        weight = theirs[f"{name}.weight"]
        state[f"{ours}.weight"] = weight.t() if conv else weight
        state[f"{ours}.bias"] = theirs[f"{name}.bias"]
    model.load_state_dict(state, strict=True)
    log.info("model initialised from the GPT-2 weights of %s (%d token rows)", folder, wte.shape[0])
