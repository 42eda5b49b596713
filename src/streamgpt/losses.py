"""Cross-entropy from the final hidden states and the LM head, a chunk of rows at a time.

A batch's logits are by far its largest tensor: 256 x 64 positions x a vocabulary of 8192 in fp32
are 537 MB, and F.cross_entropy keeps as much again for backward (the log-softmax), then their
gradient. Here the rows (positions) are cut into chunks; a chunk's logits are made, turned into
its loss and at once into its gradient (softmax - one-hot, over the number of rows: the gradient of
the mean), which goes through the head to the hidden states and the head's weight; then they are
freed. Only one chunk's logits ever exist. The gradients are computed in the forward pass, as
Liger-Kernel's fused linear cross-entropy does: backward only scales them by the incoming gradient,
so it costs no extra matmul, and nothing of the chunks is kept for it.

Numerics follow F.cross_entropy(head(h).float(), targets): the matmuls run in the autocast dtype
when autocast is on (the head's Linear would), softmax and the loss in fp32; the weight's gradient
is summed over chunks in fp32.
"""

from __future__ import annotations

import torch


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _head_for_grad(w: torch.Tensor) -> torch.Tensor:
    """W for `g @ W`. On a CPU, bf16 matrices multiply fast only when the second operand is
    transposed in memory (model.py's Linear explains): then W^T is made contiguous once per step,
    and the chunks multiply by its transpose. Same numbers."""
    if w.device.type == "cpu" and w.dtype == torch.bfloat16:
        return w.t().contiguous().t()
    return w


class _Buffers:
    """One chunk's logits (fp32), and in a lower compute dtype its copy, allocated once per call
    and reused by every chunk: glibc (as streamgpt.malloc sets it) does not reuse a freed block
    of this size for the next one of the same size, so a fresh buffer per chunk grew the heap by
    several chunks' worth."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device) -> None:
        self.fp32 = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        low = dtype != torch.float32
        self.low = torch.empty(rows, vocab, dtype=dtype, device=device) if low else None
        # The gradient (softmax - one-hot) / rows is made before backward's upstream gradient
        # (16-mixed's loss scale) multiplies it: in fp16 its small entries would flush to zero,
        # so under fp16 autocast it stays in fp32 (and so do its two matmuls). bf16 has fp32's
        # range.
        self.grad_dtype = torch.float32 if dtype == torch.float16 else dtype

    def logits(self, h_c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        rows = h_c.size(0)
        if self.low is None:
            return torch.matmul(h_c, w.t(), out=self.fp32[:rows])
        return self.fp32[:rows].copy_(torch.matmul(h_c, w.t(), out=self.low[:rows]))

    def to_grad_dtype(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.grad_dtype == torch.float32 else self.low[: x.size(0)].copy_(x)


def _chunk_loss(
    h_c: torch.Tensor, w: torch.Tensor, t_c: torch.Tensor, buffers: _Buffers
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The NLL of each row of a chunk (fp32), exp(logits - their max) (in buffers.fp32) and its
    sum per row. In place: no temporaries of the logits' size (torch.logsumexp makes two)."""
    logits = buffers.logits(h_c, w)
    target_logit = logits.gather(1, t_c)
    top = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(top).exp_()
    sums = exps.sum(dim=-1, keepdim=True)
    return (sums.log() + top - target_logit)[:, 0], exps, sums


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, dtype: torch.dtype, needs_grad: bool):
        n = h.size(0)
        with torch.autocast(h.device.type, enabled=False):
            hd, w = h.to(dtype), weight.to(dtype)
            buffers = _Buffers(min(chunk, n), w.size(0), dtype, h.device)
            w_g, h_g = (w, hd) if buffers.grad_dtype == dtype else (weight.float(), h.float())
            w_for_grad = _head_for_grad(w_g) if needs_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if needs_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
            for start in range(0, n, chunk):
                h_c, t_c = hd[start : start + chunk], targets[start : start + chunk, None]
                nll, exps, sums = _chunk_loss(h_c, w, t_c, buffers)
                total += nll.sum()
                if not needs_grad:
                    continue
                # d(mean loss)/d(logits) = (softmax - one-hot) / n, in one pass over the chunk
                g = exps.div_(sums * n).scatter_add_(1, t_c, torch.full_like(sums, -1 / n))
                g = buffers.to_grad_dtype(g)
                grad_h[start : start + chunk] = g @ w_for_grad
                grad_w += (g.t() @ h_g[start : start + chunk]).float()
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """The mean of F.cross_entropy(h @ weight.T, targets) over the rows of h (N, d), holding at
    most `chunk` rows of logits at a time. Gradients flow to h and weight (a tied embedding's
    gradient adds up with it, as for any parameter used twice)."""
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    dtype = _compute_dtype(h, weight)
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk, dtype, needs_grad)


@torch.no_grad()
def chunked_token_nll(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, reduction="none") (fp32, one per row of h), at most
    `chunk` rows of logits at a time: for evaluation (no gradient)."""
    dtype = _compute_dtype(h, weight)
    out = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        buffers = _Buffers(min(chunk, h.size(0)), w.size(0), dtype, h.device)
        for start in range(0, h.size(0), chunk):
            h_c, t_c = h[start : start + chunk].to(dtype), targets[start : start + chunk, None]
            out[start : start + chunk] = _chunk_loss(h_c, w, t_c, buffers)[0]
    return out
