"""Optimizers and the learning-rate schedule, all in steps (a stream has no epochs).

- adamw: decoupled weight decay on matrices only (embeddings and linear weights), never on
  norms or biases; fused kernels where the device has them.
- lion: sign-of-momentum updates (Chen et al. 2023, "Symbolic Discovery of Optimization
  Algorithms"). Researchers sweep it against AdamW because it needs one moment instead of two
  (a third less optimizer memory) and behaves differently with batch size; its lr is typically
  3-10x smaller and its weight decay 3-10x larger than AdamW's.
- muon: torch.optim.Muon (Jordan et al. 2024; the optimizer of modded-nanogpt and nanochat) for the
  2-D weights of the transformer blocks, which step with momentum orthogonalised by Newton-Schulz,
  at `lr` (streamgpt.muon: torch's step, with Newton-Schulz in float32 where bfloat16 is slow);
  AdamW (as adamw above) for the rest (embeddings, an untied head, norms' gains, biases) at
  `adam_lr`. The two are one Optimizer (MuonAdamW): one LR schedule, one checkpoint state.
Schedule, in steps up to `decay_steps` (default: the run's max_steps), flat at its floor
`lr * min_lr_ratio` after: cosine, linear warmup to `lr` then cosine decay to the floor; wsd
(warmup-stable-decay, modded-nanogpt's "trapezoidal"), linear warmup, flat at `lr`, then linear
decay to the floor over the last `decay_fraction` of the steps. With a wall-clock budget
(trainer.budget_s) the schedule follows time instead: warmup in steps, then its progress is the
share of the time from warmup's end to the budget's end spent (or of the steps to max_steps, if
further), so it reaches the floor when the budget ends whatever the steps per second
(`timed_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from streamgpt.muon import NS_DTYPES, Muon, closure_loss, ns_dtype_for

OPTIMIZERS = ("adamw", "lion", "muon")
SCHEDULES = ("cosine", "wsd")


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-4  # muon: the lr of the blocks' matrices (Muon's)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # null: the trainer's max_steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: the last share of the steps, decaying linearly
    # optimizer=muon only: AdamW's lr (the parameters Muon does not take), Muon's settings.
    adam_lr: float | None = None
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.0
    muon_ns_dtype: str = "auto"  # auto | bfloat16 | float32 (auto: float32 where bf16 is slow)

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("name", self.name, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("muon_ns_dtype", self.muon_ns_dtype, NS_DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"optimizer.{key} must be one of {list(allowed)}, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(
                f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}"
            )
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optimizer.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(
                f"optimizer.decay_fraction must be in (0, 1], got {self.decay_fraction}"
            )
        self._check_muon()

    def _check_muon(self) -> None:
        if self.name != "muon":
            if self.adam_lr is not None:
                raise ValueError(
                    f"optimizer.adam_lr is the AdamW lr of optimizer=muon; optimizer={self.name} "
                    "has one lr, optimizer.lr: drop optimizer.adam_lr"
                )
            return
        if self.adam_lr is None or self.adam_lr <= 0:
            raise ValueError(
                "optimizer=muon needs optimizer.adam_lr, positive: the lr of what AdamW steps "
                f"(embeddings, head, norms, biases), got {self.adam_lr}"
            )
        if not 0 <= self.muon_momentum < 1 or self.muon_ns_steps < 1:
            raise ValueError(
                "optimizer.muon_momentum must be in [0, 1) and optimizer.muon_ns_steps >= 1, got "
                f"{self.muon_momentum} and {self.muon_ns_steps}"
            )
        if self.muon_weight_decay < 0:
            raise ValueError(
                f"optimizer.muon_weight_decay must be >= 0, got {self.muon_weight_decay}"
            )


class Lion(Optimizer):
    """Lion: update = sign(beta1 * m + (1 - beta1) * g); m <- beta2 * m + (1 - beta2) * g."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
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


class MuonAdamW(Optimizer):
    """A Muon and an AdamW stepped as one optimizer: one param_groups list (Muon's first, so
    `lr` logs Muon's), one state and so one state_dict, which the two share. A LambdaLR scales
    every group's lr by the same factor; a checkpoint saves and restores both."""

    def __init__(self, muon: Optimizer, adamw: Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n]
        self.adamw.param_groups = self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state  # their parameters are disjoint

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new group dicts and state: share them again
        self._share()


def param_groups(model: nn.Module, weight_decay: float, params=None) -> list[dict]:
    """Decay matrices (dim >= 2: embeddings, linear weights); not norms, biases, scalars.
    `params`: only these of the model's."""
    decay, no_decay = [], []
    for p in model.parameters() if params is None else params:
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
    fused = fused_ok and device_type in ("cuda", "cpu")  # torch has fused AdamW for both
    if cfg.name == "muon":
        return build_muon(model, cfg, device_type, fused)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def build_muon(model: nn.Module, cfg: OptimizerConfig, device_type: str, fused: bool) -> MuonAdamW:
    """Muon takes the blocks' 2-D weights (attention qkv and projection, MLP up and down, each as
    one matrix); AdamW, at adam_lr, everything else as optimizer=adamw would."""
    matrices = [p for p in model.blocks.parameters() if p.dim() == 2 and p.requires_grad]
    owned = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in owned]
    muon = Muon(
        matrices,
        ns_dtype=ns_dtype_for(cfg.muon_ns_dtype, device_type),
        lr=cfg.lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
    )
    adamw = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, rest),
        lr=cfg.adam_lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused,
    )
    return MuonAdamW(muon, adamw)


def lr_factor(step: int, warmup: int, decay: int, floor: float) -> float:
    """Multiplier of the peak lr at a step: linear warmup, cosine to `floor`, then flat."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay:
        return floor
    progress = (step - warmup) / max(1, decay - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_factor(step: int, warmup: int, decay: int, floor: float, fraction: float) -> float:
    """Multiplier of the peak lr at a step: linear warmup, flat at 1, then linear to `floor` over
    the last `fraction` of the `decay` steps, flat after."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay:
        return floor
    start = decay * (1 - fraction)
    if step < start:
        return 1.0
    return 1 - (1 - floor) * (step - start) / (decay - start)


class Clock(Protocol):
    """What a timed schedule reads (endings.TimeBudget): the time of the last step's end and the
    budget's end, in seconds since the epoch, the same on every rank."""

    now: float
    deadline: float


def time_progress(now: float, start: float, deadline: float) -> float:
    """The share of the time from `start` to `deadline` spent at `now`, in [0, 1] (1 when the
    deadline is already behind `start`)."""
    if deadline <= start:
        return 1.0
    return min(1.0, max(0.0, (now - start) / (deadline - start)))


def timed_factor(progress: float, floor: float, schedule: str, fraction: float) -> float:
    """Multiplier of the peak lr after warmup at `progress` (time_progress): cosine from 1 to
    `floor`; or wsd, flat at 1 until the last `fraction` of the time, then linear to `floor`."""
    if schedule == "wsd":
        start = 1 - fraction
        return 1.0 if progress < start else 1 - (1 - floor) * (progress - start) / fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def timed_schedule(
    cfg: OptimizerConfig, clock: Clock, max_steps: int | None = None
) -> Callable[[int], float]:
    """The lr multiplier at a step when a wall-clock budget sets the run's length: linear warmup
    over `warmup_steps`, then timed_factor of the time spent since warmup ended, or of the steps
    done towards `max_steps` (trainer.max_steps, the budget's upper bound) when they are further
    along: on a machine fast enough to reach max_steps first, the lr still reaches its floor."""
    warmup, ended = cfg.warmup_steps, []

    # A closure, not an object: LambdaLR saves an object's attributes in the checkpoint.
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not ended:
            ended.append(clock.now)  # warmup's end: the schedule's time starts here
        progress = time_progress(clock.now, ended[0], clock.deadline)
        if max_steps:
            progress = max(progress, min(1.0, (step - warmup) / max(1, max_steps - warmup)))
        return timed_factor(progress, cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction)

    return factor


def build_schedule(
    optimizer: Optimizer, cfg: OptimizerConfig, max_steps: int, clock: Clock | None = None
) -> LambdaLR:
    """The lr schedule over `max_steps` (or optimizer.decay_steps); over time with a `clock`."""
    if clock is not None:
        return LambdaLR(optimizer, timed_schedule(cfg, clock, max_steps))
    decay = cfg.decay_steps or max_steps
    if decay is None or decay <= 0:
        raise ValueError(
            "the lr schedule needs a length: set trainer.max_steps or optimizer.decay_steps"
        )
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        return LambdaLR(
            optimizer, lambda s: wsd_factor(s, warmup, decay, floor, cfg.decay_fraction)
        )
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, decay, floor))
