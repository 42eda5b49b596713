"""Faults during real training runs (`python train.py` subprocesses): a server killed again and
again, a trainer killed again and again, broken checkpoints. Nothing may be lost or repeated."""

from __future__ import annotations

import csv
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from streamgpt.server.process import ServerProcess

from .helpers.runs import batches, output, start, train, wait_for


def metric(run: Path, name: str) -> list[float]:
    with open(next(run.rglob("metrics.csv"))) as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.slow
def test_training_survives_a_server_killed_and_restarted_again_and_again(tmp_path):
    steps = [
        "trainer.max_steps=400",
        "trainer.val_every=100",
        "callbacks.sample_every=100",
        "callbacks.checkpoint_every=100",
        "data.stream.samples_per_request=2",
        "data.stream.requests_in_flight=1",
        "data.stream.prefetch_batches=2",
        "data.stream.retry.backoff_s=0.2",
        "data.stream.retry.max_backoff_s=1",
    ]
    with ServerProcess([f"hydra.run.dir={tmp_path / 'quiet'}"]) as quiet:
        done = train(tmp_path / "reference", f"data.stream.url={quiet.url}", *steps)
    assert done.returncode == 0, done.stderr[-3000:]

    server = ServerProcess([f"hydra.run.dir={tmp_path / 's0'}"]).start()
    port = server.port
    run = tmp_path / "chaos"
    trainer = start(run, f"data.stream.url={server.url}", *steps)
    rng, servers, outages = random.Random(0), [server], []
    try:
        for kill, step in enumerate((20, 60, 100, 140, 180, 220, 260, 300), start=1):
            wait_for(lambda s=step: len(batches(run)) >= s, trainer, f"step {step}")
            servers[-1].proc.send_signal(signal.SIGKILL)
            assert servers[-1].proc.wait() == -signal.SIGKILL
            assert trainer.poll() is None and len(batches(run)) < 400, "killed mid-run"
            outage = rng.uniform(0.3, 1.5)
            time.sleep(outage)  # the outage itself: the trainer keeps asking, nothing listens
            outages.append(outage)
            servers.append(
                ServerProcess([f"port={port}", f"hydra.run.dir={tmp_path / f's{kill}'}"]).start()
            )
        assert trainer.wait(600) == 0, output(run)[-3000:]
    finally:
        trainer.kill()
        for s in servers:
            s.stop()
    assert len(outages) == 8
    assert batches(run) == batches(tmp_path / "reference"), "the same samples, in the same order"
    waited, calm = (
        max(metric(run, "perf/data_wait_s")),
        max(metric(tmp_path / "reference", "perf/data_wait_s")),
    )
    print(
        f"chaos: 8 server kills, outages up to {max(outages):.2f} s; longest data wait "
        f"{waited:.2f} s (undisturbed {calm:.3f} s)"
    )
    # The few batches queued ahead cover a fraction of a second; the rest of the longest outage
    # shows as waiting for data, and nothing like it without faults.
    assert waited >= max(outages) - 0.5, f"perf/data_wait_s shows the outages: {waited}"
    assert calm < 0.1, f"undisturbed, the trainer waited {calm} s for data"


@pytest.mark.slow
def test_a_trainer_killed_at_random_steps_and_resumed_ends_with_the_same_model(tmp_path):
    steps = [
        "trainer.max_steps=120",
        "trainer.val_every=10",
        "callbacks.sample_every=60",
        "callbacks.checkpoint_every=10",
        "trainer.deterministic=true",
    ]
    reference = tmp_path / "reference"
    assert train(reference, *steps).returncode == 0
    run = tmp_path / "run"
    rng = random.Random(1)
    for _attempt in range(3):
        proc = start(run, *steps, "resume=auto")
        target = len(batches(run)) + rng.randint(12, 30)  # a few steps past the next checkpoint
        wait_for(lambda t=target: len(batches(run)) >= t, proc, f"step {target}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "killed mid-run, not finished"
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        assert saved <= len(batches(run)) < 120, "killed between a checkpoint and the end"
    done = train(run, *steps, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "train.log").read_text().count("resume=auto: continuing from") >= 3
    ours = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    theirs = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert ours["global_step"] == theirs["global_step"] == 120
    for name, weight in theirs["state_dict"].items():
        assert torch.allclose(ours["state_dict"][name], weight, atol=1e-6), name


def test_a_truncated_checkpoint_is_refused_naming_it_and_resume_auto_falls_back(tmp_path):
    run = tmp_path / "run"
    steps = [
        "trainer.max_steps=4",
        "trainer.val_every=2",
        "callbacks.checkpoint_every=2",
        "callbacks.sample_every=2",
        "callbacks.n_saved=2",
    ]
    assert train(run, *steps).returncode == 0
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    done = train(tmp_path / "other", *steps, f"ckpt_path={last}")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"ckpt_path={last} cannot be resumed from: {last} is truncated or corrupt" in output
    assert "Traceback" not in output
    assert "embedded stream server stopped" in output  # by the run, not left behind
    done = train(run, "trainer.max_steps=6", *steps[1:], "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert f"skipping checkpoint: {last} is truncated or corrupt" in log
    assert "resume=auto: continuing from" in log and "step=0000004" in log
