"""Optimizers and the learning-rate schedule, all in steps (a stream has no epochs).

- adamw: decoupled weight decay on matrices only (embeddings and linear weights), never on
  norms or biases; fused kernels where the device has them.
- lion: sign-of-momentum updates (Chen et al. 2023, "Symbolic Discovery of Optimization
  Algorithms"). Researchers sweep it against AdamW because it needs one moment instead of two
  (a third less optimizer memory) and behaves differently with batch size; its lr is typically
  3-10x smaller and its weight decay 3-10x larger than AdamW's.
Schedule: linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `decay_steps`
(default: the run's max_steps), flat after that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adamw", "lion")


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # null: the trainer's max_steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(
                f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}"
            )
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optimizer.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")


class Lion(Optimizer):
    """Lion: update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(momentum.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2: embeddings, linear weights); not norms, biases, scalars."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, device_type: str, fused_ok: bool = True
) -> Optimizer:
    """`fused_ok=False` where the caller cannot use a fused step (Lightning's mixed precision
    refuses to clip the gradients of an optimizer that unscales them itself)."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    fused = fused_ok and device_type in ("cuda", "cpu")  # torch has fused AdamW for both
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_factor(step: int, warmup: int, decay: int, floor: float) -> float:
    """Multiplier of the peak lr at a step: linear warmup, cosine to `floor`, then flat."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay:
        return floor
    progress = (step - warmup) / max(1, decay - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(optimizer: Optimizer, cfg: OptimizerConfig, max_steps: int) -> LambdaLR:
    decay = cfg.decay_steps or max_steps
    if decay is None or decay <= 0:
        raise ValueError(
            "the cosine schedule needs a length: set trainer.max_steps or optimizer.decay_steps"
        )
    return LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, decay, cfg.min_lr_ratio)
    )
