"""A run's wall-clock budget, `trainer.budget_s`: train for this many seconds from the process's
start (start-up included), whatever the steps per second.

endings.TimeBudget stops training at the first step end past the budget (validation, samples and
last.ckpt of that step are written as at any end) and is the clock the lr schedule then follows
(optim.timed_schedule: warmup in steps, then cosine or wsd over the time left, at the floor when
the budget ends). trainer.max_steps stays an upper bound: a machine that would reach it first
anneals over the steps instead. Checked here, before any work.
"""

from __future__ import annotations

from typing import Any

from streamgpt.server.config import require


def check_config(cfg: Any) -> None:
    """trainer.budget_s positive or null, and not with what it contradicts, in one line."""
    budget = cfg.trainer.budget_s
    if budget is None:
        return
    require(
        isinstance(budget, int | float) and budget > 0,
        "trainer.budget_s",
        "positive (seconds from the process start) or null",
        budget,
    )
    if cfg.optimizer.decay_steps is not None:
        raise ValueError(
            f"optimizer.decay_steps={cfg.optimizer.decay_steps} and trainer.budget_s={budget} "
            "both say when the lr reaches its floor: drop optimizer.decay_steps (with a budget "
            "the schedule ends when the budget does)"
        )
    check_resume(budget, cfg.ckpt_path)


def check_resume(budget_s: float | None, checkpoint: str | None) -> None:
    """A budget counts from this process's start and anneals over this run alone: a resumed run
    would train its budget again on top of the checkpoint's steps, on a schedule that restarts."""
    if budget_s is not None and checkpoint:
        raise ValueError(
            f"trainer.budget_s={budget_s} times a fresh run from its process start and cannot "
            f"continue {checkpoint}: drop trainer.budget_s to resume, or start a new run folder "
            "without ckpt_path / resume=auto"
        )
