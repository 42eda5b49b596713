"""trainer.budget_s: a run timed from its process start. The lr schedule over time (warmup in
steps, then cosine or wsd over the time left), what the budget is refused with, and a real
`python train.py` run that the budget ends: after the step it ran out in, at the lr floor, with
that step validated, sampled and checkpointed."""

from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from streamgpt.config import register_configs, validate
from streamgpt.optim import (
    OptimizerConfig,
    build_schedule,
    time_progress,
    timed_factor,
    timed_schedule,
)

from .helpers.runs import batches, train

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(
    ("now", "progress"), [(100, 0.0), (90, 0.0), (125, 0.25), (150, 0.5), (200, 1.0), (260, 1.0)]
)
def test_time_progress_is_the_share_of_the_time_from_start_to_deadline_spent(now, progress):
    assert time_progress(now, start=100.0, deadline=200.0) == pytest.approx(progress)


def test_a_deadline_already_behind_the_start_means_the_schedule_is_over():
    assert time_progress(150.0, start=150.0, deadline=120.0) == 1.0


@pytest.mark.parametrize(
    ("progress", "cosine", "wsd"),
    [
        (0.0, 1.0, 1.0),
        (0.25, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0),
        (0.5, 0.55, 1.0),
        (0.79, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.79)), 1.0),
        (0.9, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)), 0.55),  # halfway down the last 20%
        (1.0, 0.1, 0.1),
    ],
)
def test_cosine_and_wsd_over_time_end_at_their_floor_when_the_time_does(progress, cosine, wsd):
    assert timed_factor(progress, 0.1, "cosine", 0.2) == pytest.approx(cosine)
    assert timed_factor(progress, 0.1, "wsd", 0.2) == pytest.approx(wsd)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_the_timed_schedule_warms_up_in_steps_then_follows_the_clock_from_warmups_end(schedule):
    clock = SimpleNamespace(now=1000.0, deadline=1100.0)
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    factor = timed_schedule(cfg, clock)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    clock.now = 1020.0  # warmup ends here: 80 s left to the deadline
    assert factor(4) == pytest.approx(1.0)
    for elapsed in (20.0, 40.0, 64.0, 80.0, 95.0):  # steps no longer matter, only the time
        clock.now = 1020.0 + elapsed
        progress = min(1.0, elapsed / 80)
        assert factor(999) == pytest.approx(timed_factor(progress, 0.1, schedule, 0.2))
    assert factor(5) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_timed_schedule_reaches_its_floor_at_max_steps_if_they_come_before_the_deadline(schedule):
    """A machine fast enough to reach trainer.max_steps (the budget's upper bound) before the
    budget ends anneals over the steps; otherwise over the time, as before."""
    clock = SimpleNamespace(now=1000.0, deadline=1100.0)
    cfg = OptimizerConfig(warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    factor = timed_schedule(cfg, clock, max_steps=14)
    assert factor(3) == pytest.approx(1.0)
    assert factor(4) == pytest.approx(1.0)  # warmup ends at 1000 s
    clock.now = 1010.0  # 10% of the time, 60% of the steps: the steps lead
    assert factor(10) == pytest.approx(timed_factor(0.6, 0.1, schedule, 0.2))
    assert factor(14) == pytest.approx(0.1)
    clock.now = 1090.0  # 90% of the time, 20% of the steps: the time leads
    assert factor(6) == pytest.approx(timed_factor(0.9, 0.1, schedule, 0.2))


def test_a_timed_schedule_keeps_no_clock_in_its_checkpoint(tmp_path):
    """LambdaLR saves an object's attributes; the closure leaves nothing that would not load."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    clock = SimpleNamespace(now=time.time(), deadline=time.time() + 60)
    schedule = build_schedule(optimizer, OptimizerConfig(warmup_steps=0), 10**9, clock)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    torch.save(schedule.state_dict(), tmp_path / "schedule.pt")
    assert torch.load(tmp_path / "schedule.pt", weights_only=True)["lr_lambdas"] == [None]


def compose_train(*overrides: str):
    register_configs(CONF)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.budget_s=0"], "trainer.budget_s must be positive (seconds from the process"),
        (["trainer.budget_s=-5"], "trainer.budget_s must be positive"),
        (
            ["trainer.budget_s=60", "optimizer.decay_steps=100"],
            "optimizer.decay_steps=100 and trainer.budget_s=60.0 both say when the lr reaches",
        ),
    ],
)
def test_a_bad_or_contradicted_budget_is_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        validate(compose_train(*overrides))
    assert "\n" not in str(error.value)
    validate(compose_train("trainer.budget_s=60"))
    validate(compose_train("trainer.budget_s=60", "resume=auto"))  # nothing found yet: fresh


def test_a_budget_with_a_checkpoint_to_resume_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(ValueError, match="times a fresh run from its process start") as error:
        validate(compose_train("trainer.budget_s=60", f"ckpt_path={ckpt}"))
    assert "\n" not in str(error.value)


def metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))


@pytest.mark.slow
def test_a_budget_ends_a_real_run_after_the_step_it_ran_out_in_at_the_lr_floor(tmp_path):
    run, budget, max_steps = tmp_path / "run", 30, 100_000
    options = [f"trainer.budget_s={budget}", f"trainer.max_steps={max_steps}"]
    options += ["optimizer.warmup_steps=2", "optimizer.lr=1e-3", "optimizer.min_lr_ratio=0.1"]
    began = time.time()
    done = train(run, *options, "trainer.val_every=1000", "callbacks.checkpoint_every=1000")
    wall = time.time() - began
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((run / "budget.json").read_text())
    step = record["step"]
    assert record["stopped_by_budget"] and 2 < step < max_steps
    assert wall >= budget
    # The clock just before the last optimizer step was past the budget, before the one before not.
    assert record["previous_step_s"] < budget <= record["last_step_s"]
    rows = metrics(run)
    lrs = {int(float(r["step"])): float(r["lr"]) for r in rows if r["lr"]}
    assert max(lrs) == step
    assert lrs[step] == pytest.approx(1e-4, rel=0.03), "the schedule reaches its floor at the end"
    after_warmup = [lrs[s] for s in sorted(lrs) if s >= 2]
    assert after_warmup == sorted(after_warmup, reverse=True), "cosine only goes down"
    assert any(2e-4 < lr < 9e-4 for lr in after_warmup), "annealed over the time, not at once"
    # The stopping step is validated, sampled and checkpointed, as at any end of a run.
    assert any(r["val/loss"] and int(float(r["step"])) == step for r in rows)
    assert (run / "samples" / f"iter_{step}" / "manual_0.txt").is_file()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == step
    assert list((run / "checkpoints").glob(f"step={step:07d}-val_loss=*.ckpt"))

    again = train(run, *options, "resume=auto")  # resume=auto now finds that checkpoint
    assert again.returncode == 2
    assert "trainer.budget_s=30.0 times a fresh run from its process start" in again.stdout


@pytest.mark.slow
def test_ddp_ranks_share_the_budget_and_stop_after_the_same_step(tmp_path):
    """Rank 1 starts later than rank 0: the deadline and the clock are rank 0's on both, or one
    rank would stop first and leave the other waiting in an all-reduce."""
    run = tmp_path / "run"
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    options = ["trainer.budget_s=40", "trainer.max_steps=100000", "optimizer.warmup_steps=2"]
    options += ["optimizer.lr=1e-3"]  # the floor below is min_lr_ratio 0.1 of it
    done = train(run, *ddp, *options, "trainer.val_every=1000", "callbacks.checkpoint_every=1000")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((run / "budget.json").read_text())
    step = record["step"]
    assert record["stopped_by_budget"] and record["previous_step_s"] < 40 <= record["last_step_s"]
    assert sorted(batches(run, 0)) == sorted(batches(run, 1)) == list(range(1, step + 1))
    lrs = {int(float(r["step"])): float(r["lr"]) for r in metrics(run) if r["lr"]}
    assert lrs[step] == pytest.approx(1e-4, rel=0.03)
