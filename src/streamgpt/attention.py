"""Causal self-attention with dropout that never keeps a whole (B, H, T, T) matrix for backward.

On a CPU, F.scaled_dot_product_attention with dropout_p > 0 cannot use its fused (flash) kernel,
so it falls back to the math path: the scores, their softmax, the dropout mask and the dropped
probabilities are each a (B, H, T, T) tensor, kept for backward, per layer. For the streaming
tutorial (batch 256, 8 heads, context 64) that is 33.5 MB apiece and ~300-400 MB of a step's peak.

`causal_dropout_attention` computes the same thing a few (batch, head) rows at a time, small
enough to stay in cache: for each chunk S = Q K^T * scale (causal), P = softmax(S), a boolean
keep mask drawn with probability 1 - p, and out = (P * keep / (1 - p)) V. It keeps for backward
only q, k, v, the keep mask (1 byte per score, a quarter of one float matrix), the output and
each row's log-sum-exp; backward recomputes P from q, k and the log-sum-exp, a chunk at a time,
as FlashAttention does. The mask is drawn by dropout.draw_keep: p is realised to 2^-16.

Only for training on a CPU with dropout: the model keeps scaled_dot_product_attention for
dropout 0, evaluation, other devices and KV-cache calls (attention.use_chunked says when).
"""

from __future__ import annotations

import torch

from streamgpt.dropout import draw_keep, exact

# Scores per chunk (rows x T x T): 2^17 floats, 512 kB, so the few (T, T) temporaries of a chunk
# stay in cache. Of 2^14, 2^15, 2^16, 2^17 and 2^18, timed on the tutorial's shapes (forward and
# backward of (256, 8, 64, 16), p = 0.1), the fastest on this 2-core CPU: ~0.8x the time of the
# math path it replaces, ~2x that of the fused kernel at dropout 0 (a busy machine: +-15%).
CHUNK_SCORES = 1 << 17


def use_chunked(q: torch.Tensor, dropout: float, causal: bool, mask) -> bool:
    """Whether causal_dropout_attention should replace F.scaled_dot_product_attention: a CPU
    training call with dropout on a plain causal mask (no KV cache, no explicit mask)."""
    return dropout > 0.0 and causal and mask is None and q.device.type == "cpu"


def causal_dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout: float,
    generator: torch.Generator | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q, k, v (B, H, T, hd) with dropout p on the attention probabilities,
    as F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True) computes it.

    `generator` draws the keep mask; `keep` (bool, (B, H, T, T)) gives it instead, so a test can
    compare with a reference that drops the same probabilities."""
    if q.device.type != "cpu":
        raise ValueError(
            f"causal_dropout_attention runs on the CPU, got tensors on {q.device}; use "
            "F.scaled_dot_product_attention there (attention.use_chunked says which to call)"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(
            f"q, k and v must share one (B, H, T, hd) shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, _ = q.shape
    if keep is not None and (keep.shape != (B, H, T, T) or keep.dtype != torch.bool):
        raise ValueError(
            f"keep must be a bool tensor of shape {(B, H, T, T)}, got {keep.dtype} "
            f"{tuple(keep.shape)}"
        )
    # Under autocast q, k, v arrive in the autocast dtype (the qkv projection's output); the
    # kernels below run in that dtype, without autocast re-casting each of them.
    with torch.autocast("cpu", enabled=False):
        return _CausalDropoutAttention.apply(q, k, v.to(q.dtype), dropout, generator, keep)


def _rows_per_chunk(T: int) -> int:
    return max(1, CHUNK_SCORES // (T * T))


class _CausalDropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout, generator, keep):
        B, H, T, hd = q.shape
        scale, rows = hd**-0.5, _rows_per_chunk(T)
        # (B*H, T, hd); reshape copies only an input that is not contiguous (the model's q, k, v
        # are transposed views of one qkv projection).
        q3, k3, v3 = (t.reshape(B * H, T, hd) for t in (q, k, v))
        out = torch.empty_like(q3)
        lse = torch.empty(B * H, T, 1, dtype=q3.dtype, device=q3.device)
        draw = keep is None
        if draw:
            keep = torch.empty(B, H, T, T, dtype=torch.bool, device=q3.device)
        keep3 = keep.view(B * H, T, T)
        # 0 on and below the diagonal, -inf above: added by the score matmul itself.
        causal = q3.new_zeros(T, T).masked_fill_(_future(T, q3.device), float("-inf"))
        for lo in range(0, B * H, rows):
            hi = min(lo + rows, B * H)
            s = torch.baddbmm(causal, q3[lo:hi], k3[lo:hi].transpose(1, 2), alpha=scale)
            row_max = s.amax(-1, keepdim=True)  # finite: every row sees its own position
            e = s.sub_(row_max).exp_()
            row_sum = e.sum(-1, keepdim=True)
            torch.add(row_max, row_sum.log(), out=lse[lo:hi])
            if dropout:
                if draw:
                    draw_keep(keep3[lo:hi], dropout, generator)
                e.mul_(keep3[lo:hi])
            # Normalise (softmax) and undo the dropout's shrinkage on (T, hd), not on (T, T).
            torch.bmm(e, v3[lo:hi], out=out[lo:hi])
            out[lo:hi].div_(row_sum * (1.0 - exact(dropout)))
        ctx.save_for_backward(q3, k3, v3, keep3, out, lse)
        ctx.dropout, ctx.shape = dropout, (B, H, T, hd)
        return out.view(B, H, T, hd)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, keep3, out, lse = ctx.saved_tensors
        B, H, T, hd = ctx.shape
        scale, dropout, rows = hd**-0.5, ctx.dropout, _rows_per_chunk(T)
        d_out = grad_out.reshape(B * H, T, hd)
        # D_i = sum_j P_ij dP_ij = dO_i . out_i, the softmax backward's row term.
        delta = (d_out * out).sum(-1, keepdim=True)
        d_out = d_out * (1.0 / (1.0 - exact(dropout)))  # the dropout's scale, on (T, hd)
        dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        future = _future(T, q3.device)
        for lo in range(0, B * H, rows):
            hi = min(lo + rows, B * H)
            s = torch.baddbmm(lse[lo:hi].neg(), q3[lo:hi], k3[lo:hi].transpose(1, 2), alpha=scale)
            p = s.masked_fill_(future, float("-inf")).exp_()  # the softmax, recomputed
            dp = torch.bmm(d_out[lo:hi], v3[lo:hi].transpose(1, 2))
            kept = p
            if dropout:
                kept = p * keep3[lo:hi]
                dp.mul_(keep3[lo:hi])
            torch.bmm(kept.transpose(1, 2), d_out[lo:hi], out=dv[lo:hi])
            ds = dp.sub_(delta[lo:hi]).mul_(p)
            torch.baddbmm(dq[lo:hi], ds, k3[lo:hi], beta=0.0, alpha=scale, out=dq[lo:hi])
            torch.baddbmm(
                dk[lo:hi], ds.transpose(1, 2), q3[lo:hi], beta=0.0, alpha=scale, out=dk[lo:hi]
            )
        shape = (B, H, T, hd)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None


def _future(T: int, device) -> torch.Tensor:
    """True above the diagonal: the positions a causal query must not see."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
