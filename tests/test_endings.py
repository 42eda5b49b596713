"""Every way a run ends, on real `python train.py` processes: finished (exit 0, every time),
stopped by a signal (a checkpoint of that step, 128 + the signal's number, resume loses nothing),
requeued under SLURM, and an embedded server that dies (restarted) or cannot start again."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import torch

from .helpers.runs import (
    batches,
    embedded_server,
    output,
    processes_using,
    start,
    train,
    wait_for,
)

STEPS = [
    "trainer.max_steps=30",
    "trainer.val_every=10",
    "callbacks.checkpoint_every=10",
    "callbacks.sample_every=10",
    "trainer.deterministic=true",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An undisturbed 30-step run: the batches and weights every interrupted run must reach."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = train(run, *STEPS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return {"step": state["global_step"], **state["state_dict"]}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_saves_that_step_exits_with_its_code_and_resume_loses_nothing(
    tmp_path, reference, signum
):
    run = tmp_path / "run"
    proc = start(run, *STEPS)
    wait_for(lambda: len(batches(run)) >= 14, proc, "step 14")  # past the step-10 checkpoint
    proc.send_signal(signum)
    assert proc.wait(120) == 128 + signum, output(run)[-3000:]
    trained = len(batches(run))
    assert 14 <= trained < 30, "the signal stopped the run before its end"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == trained, "the checkpoint holds the step it stopped at"
    name = signal.Signals(signum).name
    assert f"stopped by {name} after step {trained}" in output(run)
    assert "Traceback" not in output(run)
    assert processes_using(run) == [], "no server (or anything else) left behind"

    done = train(run, *STEPS, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert f"resume=auto: continuing from {run / 'checkpoints' / 'last.ckpt'}" in log
    got, want = batches(run), batches(reference)
    assert sorted(got) == list(range(1, 31)), "every step trained once"
    assert [got[b]["x"] for b in got] == [want[b]["x"] for b in got]
    ours, theirs = weights(run), weights(reference)
    assert ours.pop("step") == theirs.pop("step") == 30
    for key, value in theirs.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key


@pytest.mark.slow
def test_before_training_a_signal_stops_at_once_and_a_second_ctrl_c_does_too(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "trainer.max_steps=400", "trainer.val_every=100")
    wait_for(lambda: "embedded stream server (shakespeare) at" in output(run), proc, "a server")
    proc.send_signal(signal.SIGTERM)  # while the tokenizer trains and Lightning imports
    assert proc.wait(120) == 143, output(run)[-3000:]
    assert "stopped by SIGTERM before training started; nothing to save" in output(run)
    assert "Traceback" not in output(run) and processes_using(run) == []

    # The CPU demo's own shapes: steps long enough to send a second Ctrl-C within one.
    slow = ["trainer.max_steps=400", "callbacks.sample_every=0", "data.stream.log_batches=true"]
    proc = start(run, *slow, small=False)
    wait_for(lambda: len(batches(run)) >= 3, proc, "step 3")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "Ctrl-C again stops at once" in output(run), proc, "the first Ctrl-C", 60)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    assert "stopped by SIGINT at once during step" in output(run)
    assert "Traceback" not in output(run) and processes_using(run) == []


@pytest.mark.slow
def test_under_slurm_the_requeue_signal_checkpoints_then_requeues_the_job(tmp_path):
    """SLURM's environment and an `scontrol` that records its arguments (no cluster here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    run = tmp_path / "run"
    proc = start(run, "trainer.max_steps=400", "trainer.val_every=100", env=slurm)
    wait_for(lambda: len(batches(run)) >= 5, proc, "step 5")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(120) == 128 + signal.SIGUSR1, output(run)[-3000:]
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == len(batches(run)) >= 5
    assert "requeued SLURM job 4242" in output(run)


@pytest.mark.slow
def test_the_embedded_server_killed_twice_is_restarted_and_the_batches_are_unchanged(tmp_path):
    steps = [
        "trainer.max_steps=80",
        "trainer.val_every=40",
        "callbacks.checkpoint_every=40",
        "callbacks.sample_every=40",
        "data.stream.samples_per_request=2",  # the run asks the server again every step or two
        "data.stream.prefetch_batches=2",
        "data.stream.retry.backoff_s=0.2",
        "data.stream.retry.max_backoff_s=1",
    ]
    reference = tmp_path / "reference"
    assert train(reference, *steps).returncode == 0
    run = tmp_path / "run"
    proc = start(run, *steps)
    killed = []
    for threshold in (15, 40):
        wait_for(lambda t=threshold: len(batches(run)) >= t, proc, f"step {threshold}")
        server = embedded_server(proc)
        assert server is not None and server.pid not in killed
        server.kill()
        killed.append(server.pid)
        assert len(batches(run)) < 80, "the kill landed while the run was training"
        wait_for(
            lambda: (s := embedded_server(proc)) is not None and s.pid not in killed,
            proc,
            "a restarted server",
            60,
        )
    assert proc.wait(600) == 0, output(run)[-3000:]
    log = (run / "train.log").read_text()
    assert log.count("the stream server exited (code -9); restarting it") == 2
    assert "(restart 2)" in log
    got, want = batches(run), batches(reference)
    assert sorted(got) == sorted(want) == list(range(1, 81))
    assert [(got[b]["ids"], got[b]["x"]) for b in got] == [
        (want[b]["ids"], want[b]["x"]) for b in got
    ]
    assert processes_using(run) == []


@pytest.mark.slow
def test_a_server_that_cannot_start_again_ends_the_run_at_once_saying_why(tmp_path):
    run = tmp_path / "run"
    proc = start(run, "trainer.max_steps=400", "trainer.val_every=100")
    wait_for(lambda: len(batches(run)) >= 3, proc, "step 3")
    server = embedded_server(proc)
    port = next(c.laddr.port for c in server.net_connections("tcp") if c.status == "LISTEN")
    squatter = socket.socket()
    squatter.setsockopt(
        socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
    )  # past the dead server's TIME_WAIT
    server.kill()
    server.wait()
    squatter.bind(("127.0.0.1", port))  # listening there first: no restart can listen too
    squatter.listen()
    began = time.monotonic()
    try:
        code = proc.wait(120)
    finally:
        squatter.close()
    out = output(run)
    assert code == 2, out[-3000:]
    assert time.monotonic() - began < 60, "ended by the supervisor, not the 120 s retry budget"
    assert "the embedded stream server died and could not be started again: 3 restarts" in out
    assert "Traceback" not in out
    assert processes_using(run) == []


@pytest.mark.slow
def test_twenty_short_runs_back_to_back_all_exit_0(tmp_path):
    """Two lanes of ten (two cores): fp32 with W&B, and bf16-mixed (the report's abort) with CSV.
    Each run validates, samples and checkpoints, then exits through every teardown."""
    lanes = {
        "32-true": ["precision=32-true", "logger=wandb", "logger.wandb.mode=offline"],
        "bf16-mixed": ["precision=bf16-mixed"],
    }
    common = ["trainer.max_steps=2", "trainer.val_every=2", "callbacks.sample_every=2"]
    common += ["callbacks.checkpoint_every=2"]
    codes: dict[str, int] = {}
    for n in range(10):
        runs = {tmp_path / f"{lane}-{n}": options for lane, options in lanes.items()}
        procs = {run: start(run, *common, *options) for run, options in runs.items()}
        for run, proc in procs.items():
            codes[run.name] = proc.wait(600)
            assert "terminate called" not in output(run), output(run)[-2000:]
            assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(codes.values()) == [0] * 20, codes
