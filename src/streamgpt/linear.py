"""Linear: nn.Linear with a faster input gradient for bfloat16 on CPUs without native bfloat16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# CPUs without native bfloat16 (no AVX512-BF16 or AMX) multiply bf16 matrices fast only when the
# second operand is transposed in memory. nn.Linear's forward is (x @ W^T: fast), but autograd
# computes its input gradient as g @ W, which takes a kernel ~13x slower and then dominates a
# bf16-mixed step. Linear below computes that gradient as g @ (W^T, made contiguous)^T instead:
# same numbers, 2-3x faster bf16 training on such CPUs (scripts/bench_train.py). Elsewhere it is
# plain nn.Linear.


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


_SLOW_CPU_BF16 = not cpu_has_native_bf16()


class _CpuBf16Linear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight.t().contiguous().t()
        flat_grad = grad.reshape(-1, grad.size(-1))
        grad_w = flat_grad.t() @ x.reshape(-1, x.size(-1))
        grad_b = flat_grad.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast_bf16 = (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        if (
            _SLOW_CPU_BF16
            and x.device.type == "cpu"
            and (autocast_bf16 or x.dtype == torch.bfloat16)
        ):
            return _CpuBf16Linear.apply(x, self.weight, self.bias)
        return super().forward(x)


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight), keeping only h for backward: the GELU's output is recomputed
    there (one elementwise pass) instead of being kept as the Linear's saved input."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.size(-1))
        grad_w = flat_grad.t() @ F.gelu(h).reshape(-1, h.size(-1))  # the GELU freed at once
        grad_h = torch.ops.aten.gelu_backward(grad @ weight, h)
        return grad_h, grad_w


def gelu_linear(h: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(F.gelu(h)). A float32 CPU training call keeps h for backward and not also the GELU's
    output (as large: the MLP's hidden width), 32 MB per layer in the streaming tutorial."""
    if (
        h.device.type != "cpu"
        or layer.bias is not None
        or torch.is_autocast_enabled("cpu")
        or h.dtype != layer.weight.dtype
        or not torch.is_grad_enabled()
    ):
        return layer(F.gelu(h))
    return _GeluLinear.apply(h, layer.weight)
