"""Hugging Face transformers, both ways: a trained GPT exported as a folder that
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load offline, and a GPT-2-shaped model
initialised from a local GPT-2 folder (`model.init_from`, hf_init.py). transformers is imported
only to export.

Which architecture reproduces ours exactly:
- learned positions, LayerNorm, GELU or ReLU^2: GPT-2 (GPT2LMHeadModel). Our GELU is the exact
  (erf) one, so activation_function is "gelu", not GPT-2's default "gelu_new" (the tanh
  approximation); ReLU^2 is transformers' "relu2"; layers
  without bias get zero biases; LayerNorm's eps is torch's 1e-5, GPT-2's default. GPT-2's Conv1D
  keeps weights as (in, out): ours are transposed.
- rotary positions, RMSNorm, SwiGLU: Llama (LlamaForCausalLM). Our rotary turns interleaved pairs
  (x0, x1), (x2, x3), ... of a head; Llama's turns halves (x_i, x_{i + hd/2}). The q and k rows of
  each head are reordered (as HF's convert_llama_weights_to_hf does): q.k is unchanged. Our SwiGLU
  `up` holds gate then value: Llama's gate_proj and up_proj.
Both tie the LM head to the embedding as ours does (model.tie_embeddings=false: their own lm_head,
tie_word_embeddings false), keep our padded vocab_size (rows beyond the tokenizer are never
produced by it) and take the tokenizer's end-of-text token as eos and bos (documents are
separated by it; our unconditional sampling starts from it). Neither normalises queries and keys:
model.qk_norm=true is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from streamgpt.checkpoints import load_gpt
from streamgpt.model import GPTConfig, RMSNorm

log = logging.getLogger("streamgpt")

SHAPES = {
    "gpt2": {"positions": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu"},
}
LAYERNORM_EPS = torch.nn.LayerNorm(1).eps
RMSNORM_EPS = RMSNorm(1).eps
# GPT-2 layer: (its module, ours, a Conv1D whose weight is stored transposed).
GPT2_LAYER = [
    ("ln_1", "norm1", False),
    ("attn.c_attn", "attn.qkv", True),
    ("attn.c_proj", "attn.proj", True),
    ("ln_2", "norm2", False),
    ("mlp.c_fc", "mlp.up", True),
    ("mlp.c_proj", "mlp.down", True),
]


def gpt2_modules(n_layers: int) -> list[tuple[str, str, bool]]:
    """(GPT-2's module, ours, stored transposed) for every layer and the final norm; GPT-2's names
    as GPT2Model has them (GPT2LMHeadModel prefixes `transformer.`)."""
    layers = [
        (f"h.{i}.{theirs}", f"blocks.{i}.{ours}", conv)
        for i in range(n_layers)
        for theirs, ours, conv in GPT2_LAYER
    ]
    return [*layers, ("ln_f", "norm", False)]


def _shape_text(shape: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def architecture(cfg: GPTConfig) -> str:
    """'gpt2' or 'llama': the transformers architecture that computes what `cfg`'s model does."""
    if cfg.qk_norm:
        raise ValueError(
            "model.qk_norm=true: neither GPT-2 nor Llama normalises queries and keys, so no "
            "exported architecture computes this model; export supports model.qk_norm=false"
        )
    fields = {k: getattr(cfg, k) for k in SHAPES["gpt2"]}
    # GPT-2's MLP takes its activation from the config: ReLU^2 is transformers' "relu2".
    if {**fields, "mlp": "gelu"} == SHAPES["gpt2"] and fields["mlp"] in ("gelu", "relu2"):
        return "gpt2"
    if fields == SHAPES["llama"]:
        return "llama"
    raise ValueError(
        f"no Hugging Face architecture computes a model with "
        f"{', '.join(f'model.{k}={v}' for k, v in fields.items())}: export supports "
        f"{_shape_text(SHAPES['gpt2'])} or relu2 (GPT-2) or {_shape_text(SHAPES['llama'])} (Llama)"
    )


# -- reading a run --------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """The model's config, its weights (our names) and the end-of-text token of a checkpoint."""
    model, state = load_gpt(path)
    weights = {k: v.float() for k, v in model.state_dict().items()}
    eos = state.get("tokenizer", {}).get("eos_token") or "<|endoftext|>"
    return model.cfg, weights, eos


def run_pad_token(run_dir: Path) -> str | None:
    """The run's tokenizer.pad_token, from its config_resolved.yaml (None if it has none)."""
    resolved = run_dir / "config_resolved.yaml"
    if not resolved.is_file():
        return None
    return (yaml.safe_load(resolved.read_text()).get("tokenizer") or {}).get("pad_token")


# -- our weights, their names ---------------------------------------------------------------------


def gpt2_weights(cfg: GPTConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "transformer.wte.weight": w["tok_emb.weight"],
        "transformer.wpe.weight": w["pos_emb.weight"],
    }
    for theirs, ours, conv in gpt2_modules(cfg.n_layers):
        theirs = f"transformer.{theirs}"
        weight = w[f"{ours}.weight"]
        out[f"{theirs}.weight"] = weight.t().contiguous() if conv else weight
        out[f"{theirs}.bias"] = w.get(f"{ours}.bias", torch.zeros(weight.shape[0]))
    return out | untied_head(cfg, w)


def untied_head(cfg: GPTConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LM head's own weights (both architectures call it lm_head), if it is not tied."""
    return {} if cfg.tie_embeddings else {"lm_head.weight": w["head.weight"]}


def halves(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A head's rows from interleaved pairs (0, 1), (2, 3), ... to halves (0, 2, ..., 1, 3, ...)."""
    head_dim = rows.shape[0] // n_heads
    return (
        rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
    )


def llama_weights(cfg: GPTConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": w["tok_emb.weight"], "model.norm.weight": w["norm.weight"]}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[f"{theirs}input_layernorm.weight"] = w[f"{ours}norm1.weight"]
        out[f"{theirs}post_attention_layernorm.weight"] = w[f"{ours}norm2.weight"]
        for kind in kinds:
            q, k, v = w[f"{ours}attn.qkv.{kind}"].chunk(3)
            out[f"{theirs}self_attn.q_proj.{kind}"] = halves(q, cfg.n_heads)
            out[f"{theirs}self_attn.k_proj.{kind}"] = halves(k, cfg.n_heads)
            out[f"{theirs}self_attn.v_proj.{kind}"] = v
            out[f"{theirs}self_attn.o_proj.{kind}"] = w[f"{ours}attn.proj.{kind}"]
            gate, value = w[f"{ours}mlp.up.{kind}"].chunk(2)
            out[f"{theirs}mlp.gate_proj.{kind}"] = gate
            out[f"{theirs}mlp.up_proj.{kind}"] = value
            out[f"{theirs}mlp.down_proj.{kind}"] = w[f"{ours}mlp.down.{kind}"]
    return {k: v.contiguous() for k, v in (out | untied_head(cfg, w)).items()}


def hf_config(cfg: GPTConfig, kind: str, ids: dict[str, int | None]) -> dict[str, Any]:
    """The transformers config (GPT2Config or LlamaConfig keyword arguments) of our model."""
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": "float32",
        **ids,
    }
    if kind == "gpt2":
        return common | {
            "n_positions": cfg.context,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.mlp_hidden,
            # gelu: exact, as F.gelu (gelu_new is tanh's); relu2: ReLU squared, as ours
            "activation_function": cfg.mlp,
            "layer_norm_epsilon": LAYERNORM_EPS,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
        }
    return common | {
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": RMSNORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
    }


# -- export ---------------------------------------------------------------------------------------


def hf_tokenizer(path: Path, eos: str, pad: str | None, context: int):
    """The run's tokenizer.json as a PreTrainedTokenizerFast: eos (also bos) and pad tokens set;
    pad falls back to eos (GPT-2's habit) when the run's pad token is not in the file."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(eos) is None:
        raise ValueError(f"{path} has no end-of-text token {eos!r} (the checkpoint's)")
    pad = pad if pad and tok.token_to_id(pad) is not None else eos
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad, model_max_length=context
    )


def export(checkpoint: Path, out: Path, tokenizer_path: Path | None = None) -> str:
    """Write `checkpoint`'s model and the run's tokenizer to `out` as transformers saves them
    (config.json, model.safetensors, generation_config.json, tokenizer files); returns the
    architecture's class name."""
    cfg, weights, eos = read_checkpoint(Path(checkpoint))
    kind = architecture(cfg)
    run_dir = Path(checkpoint).resolve().parent.parent
    tokenizer_path = Path(tokenizer_path or run_dir / "tokenizer.json")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {tokenizer_path}; pass --tokenizer path/to/tokenizer.json"
        )
    import transformers

    tokenizer = hf_tokenizer(tokenizer_path, eos, run_pad_token(run_dir), cfg.context)
    ids = {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if kind == "gpt2":
        config = transformers.GPT2Config(**hf_config(cfg, kind, ids))
        model_class, state = transformers.GPT2LMHeadModel, gpt2_weights(cfg, weights)
    else:
        config = transformers.LlamaConfig(**hf_config(cfg, kind, ids))
        model_class, state = transformers.LlamaForCausalLM, llama_weights(cfg, weights)
    with torch.device("meta"):  # no random init: every weight is ours
        model = model_class(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.state_dict().items() if p.is_meta]
    assert not missing, f"weights not mapped: {missing}"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model_class.__name__
