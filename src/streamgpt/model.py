"""BabyGPT: a decoder-only transformer in one readable file (a pure nn.Module, no Lightning).

Token embedding -> positions (a learned table, or rotary in attention) -> n_layers pre-norm blocks
of causal self-attention (F.scaled_dot_product_attention, or attention.py's when training with
dropout on a CPU; optionally QK-norm) and an MLP (GELU, SwiGLU or ReLU^2) -> final norm -> LM head,
tied to the embedding or its own. GPT-2 initialisation, with the residual output projections
scaled down by sqrt(2 * n_layers) so the residual stream does not grow with depth. QK-norm, ReLU^2
and the untied head are what the small-GPT speedruns (modded-nanogpt, nanochat) found helps; all
are off by default.

`generate` samples with a KV cache: a prompt costs one forward pass, then each new token one
single-position pass. Past the context length every token needs the whole window again (learned
positions are absolute), so it falls back to a full forward over the last `context` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from streamgpt.attention import causal_dropout_attention, use_chunked
from streamgpt.dropout import Dropout
from streamgpt.linear import Linear, gelu_linear
from streamgpt.losses import chunked_cross_entropy, chunked_token_nll

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
POSITIONS = ("learned", "rotary")
QK_NORM_EPS = 1e-6


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    context: int = 256  # the longest sequence the model sees (max_length)
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = (
        4.0  # hidden width / d_model (SwiGLU keeps the parameter count with 2/3 of it)
    )
    mlp: str = "gelu"
    norm: str = "layernorm"
    positions: str = "learned"
    # Each head's queries and keys RMS-normalised (no gain) before the dot product.
    qk_norm: bool = False
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True  # false: an LM head of its own, zero at init
    rope_theta: float = 10000.0
    # The loss from the final hidden states this many positions at a time (losses.py), so the
    # whole batch's logits (batch x context x vocab) never exist at once in a training or
    # validation step; forward then returns no logits with the loss. 0: full logits.
    loss_chunk: int = 2048

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"model.{name} must be a positive integer, got {getattr(self, name)}"
                )
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"choose n_heads among {divisors[:12]}"
            )
        for name, allowed in (("mlp", MLPS), ("norm", NORMS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")
        if self.loss_chunk < 0:
            raise ValueError(
                f"model.loss_chunk must be >= 0 (0: full logits), got {self.loss_chunk}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = self.mlp_ratio * self.d_model
        if self.mlp == "swiglu":
            hidden = hidden * 2 / 3  # three matrices instead of two: same parameters
        return max(1, round(hidden))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return (
        nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        if cfg.norm == "layernorm"
        else RMSNorm(cfg.d_model)
    )


def rotary_tables(cfg: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device) / cfg.head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=inv.dtype), inv)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of each head by position-dependent angles. x: (B, H, T, hd)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated to the context."""

    def __init__(self, cfg: GPTConfig, batch: int, device, dtype) -> None:
        shape = (cfg.n_layers, batch, cfg.n_heads, cfg.context, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual = True  # scaled at init
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.cfg.n_heads, self.cfg.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if self.cfg.qk_norm:
            # Parameter-free, before rotary, as modded-nanogpt (nanochat normalises after: the
            # same, since a rotation keeps the norm). Attention logits are bounded by sqrt(hd).
            q, k = (
                F.rms_norm(q, (q.size(-1),), eps=QK_NORM_EPS),
                F.rms_norm(k, (k.size(-1),), eps=QK_NORM_EPS),
            )
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, causal = None, T > 1
        if cache is not None and cache.length > 0:
            start = cache.length
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
            # New positions see everything cached and, among themselves, only the past.
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            causal = False
        elif cache is not None:
            cache.k[layer, :, :, :T] = k
            cache.v[layer, :, :, :T] = v
        p = self.dropout if self.training else 0.0
        if use_chunked(q, p, causal, mask):  # the CPU's SDPA keeps 4 (B, H, T, T) per layer
            y = causal_dropout_attention(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
            )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden
        self.up = Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=cfg.bias)
        self.down = Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.down.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, value = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * value)
        h = self.up(x)
        # ReLU^2 (So et al. 2021, "Primer"): modded-nanogpt's MLP, ~1-2% better than GELU there.
        if self.kind == "relu2":
            return self.down(F.relu(h).square())
        return gelu_linear(h, self.down)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, layer=0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.context, cfg.d_model) if cfg.positions == "learned" else None
        )
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # one matrix reads and writes tokens
        if cfg.positions == "rotary":
            cos, sin = rotary_tables(cfg, cfg.context)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        if not cfg.tie_embeddings:
            # modded-nanogpt's untied head starts at zero: every logit 0, the first loss ln(vocab).
            nn.init.zeros_(self.head.weight)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = (
                0.02 / math.sqrt(2 * self.cfg.n_layers)
                if getattr(module, "residual", False)
                else 0.02
            )
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_positions: bool = True) -> int:
        """Parameters (the tied embedding counted once); the position table excluded by default."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM / nanoGPT: 6N + 12 L d T, N
        without an untied embedding (a lookup, no matmul; tied, it is the head's matmul)."""
        T = context or self.cfg.context
        n = self.num_params()
        if not self.cfg.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * T

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean next-token cross-entropy (or with
        reduction="none", each target's, (B, T)). With targets and cfg.loss_chunk > 0 the loss is
        computed a chunk of positions at a time and the logits are None: ask without targets."""
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.context:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the context of {self.cfg.context}"
            )
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        h = self.norm(x)
        if targets is None:
            return self.head(h), None
        return self.loss(h, targets, reduction)

    def loss(
        self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits or None, loss) of the final hidden states h (B, T, d) against targets (B, T)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f'reduction must be "mean" or "none", got {reduction!r}')
        flat_h, flat_targets, chunk = h.flatten(0, 1), targets.flatten(), self.cfg.loss_chunk
        if chunk and reduction == "mean":
            return None, chunked_cross_entropy(flat_h, self.head.weight, flat_targets, chunk)
        if chunk:
            nll = chunked_token_nll(flat_h, self.head.weight, flat_targets, chunk)
            return None, nll.view(targets.shape)
        logits = self.head(h)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), flat_targets, reduction=reduction)
        return logits, loss.view(targets.shape) if reduction == "none" else loss

    # -- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_stream(
        self,
        prompt: torch.Tensor | list[int],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[int]:
        """Yield new token ids one at a time (a single sequence), stopping at EOS (not yielded)."""
        device = self.tok_emb.weight.device
        ids = torch.as_tensor(prompt, dtype=torch.long, device=device).view(1, -1)
        if ids.numel() == 0:
            if eos_id is None:
                raise ValueError(
                    "an empty prompt needs eos_id to start from (unconditional sampling)"
                )
            ids = torch.tensor([[eos_id]], device=device)
        ids = ids[:, -self.cfg.context :]  # a longer prompt is cropped to the context
        cache = KVCache(self.cfg, 1, device, self.tok_emb.weight.dtype) if use_cache else None
        logits, _ = self(ids, cache=cache)
        for _ in range(max_new_tokens):
            token = sample(logits[:, -1], temperature, top_k, top_p, generator)
            if eos_id is not None and token == eos_id:
                return
            yield token
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
            if cache is not None and cache.length < self.cfg.context:
                logits, _ = self(ids[:, -1:], cache=cache)
            else:  # past the context (or no cache): the whole window again
                cache = None
                logits, _ = self(ids[:, -self.cfg.context :])

    def generate(self, prompt, max_new_tokens: int, **kwargs) -> list[int]:
        """The prompt's continuation: new token ids, up to max_new_tokens, stopping at EOS."""
        return list(self.generate_stream(prompt, max_new_tokens, **kwargs))


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token from (1, vocab) logits. temperature 0 is greedy."""
    logits = logits[0].float()
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
        drop = sorted_probs.cumsum(0) - sorted_probs > top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
