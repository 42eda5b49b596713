"""Muon with its Newton-Schulz orthogonalisation in a dtype of our choosing.

torch.optim.Muon always runs Newton-Schulz in bfloat16: right on a GPU, but on a CPU without
native bfloat16 (no AVX512-BF16 or AMX) those products take a slow kernel, and babygpt-tiny's
Muon step then costs more than its forward and backward pass (~770 ms against ~600 ms on 2
cores; float32: ~55 ms; scripts/bench_muon.py). torch's Muon has no hook for the
orthogonalisation, so `Muon` below keeps its constructor (arguments, defaults, checks, param
groups, state: a checkpoint of either loads into the other) and replaces `step` with the same
update, Newton-Schulz in `ns_dtype`. With `ns_dtype=torch.bfloat16` it is torch's step bit for
bit (tests/test_optim.py checks).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from streamgpt.linear import cpu_has_native_bf16

NS_DTYPES = ("auto", "bfloat16", "float32")


def ns_dtype_for(setting: str, device_type: str) -> torch.dtype:
    """`auto`: bfloat16 (torch's choice) except on a CPU without native bfloat16: float32."""
    if setting == "auto":
        slow_bf16 = device_type == "cpu" and not cpu_has_native_bf16()
        return torch.float32 if slow_bf16 else torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


def orthogonalise(
    update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype
) -> Tensor:
    """torch's _zeropower_via_newtonschulz (Keller Jordan's quintic iteration) in `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    # Not in place: in float32 `.to` returns the momentum buffer itself (torch's .bfloat16()
    # always copies).
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's: "original" (default) keeps the update's RMS across shapes, Moonshot's
    "match_rms_adamw" matches AdamW's."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def closure_loss(closure) -> Tensor | None:
    """What an optimizer's step does with its closure first: run it with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """torch.optim.Muon, Newton-Schulz in `ns_dtype`. The dtype is the optimizer's, not a group
    setting: it stays out of the state_dict, so a run resumed on other hardware takes that
    hardware's."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        grad, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss
