"""The stream client inside a real Lightning Trainer: checkpoints, resume, DDP, data-wait metric."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.endings import StreamEndSync
from streamgpt.monitors import ThroughputMonitor
from streamgpt.server.process import ServerProcess

from .helpers.servers import stream_cfg
from .helpers.tiny_lm import TinyLM, small_gpt

REPO = Path(__file__).resolve().parents[1]


def fit(url, run: Path, steps: int, ckpt_path=None, every=None, workers=0):
    dm = StreamDataModule(
        stream_cfg(url, num_workers=workers), TokenizerConfig(vocab_size=512), run
    )
    callbacks = [ThroughputMonitor(), StreamEndSync(dm)]
    if every:
        callbacks.append(
            ModelCheckpoint(dirpath=run / "ckpt", every_n_train_steps=every, save_top_k=-1)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=CSVLogger(run / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=5,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_checkpointing=bool(every),
    )
    torch.manual_seed(0)
    model = TinyLM()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("workers", [0, 2])
def test_a_checkpointed_run_resumes_with_the_batches_it_would_have_trained(
    stream_server, tmp_path, workers
):
    url, run = stream_server.url, tmp_path / "part"
    full, _ = fit(url, tmp_path / "full", steps=12, workers=workers)
    fit(url, run, steps=12, every=5, workers=workers)
    checkpoint = run / "ckpt" / "epoch=0-step=5.ckpt"
    resumed, trainer = fit(url, run, steps=12, ckpt_path=checkpoint, every=5, workers=workers)
    assert trainer.global_step == 12
    assert len(resumed.trained_x) == 7
    for a, b in zip(full.trained_x[5:], resumed.trained_x, strict=True):
        assert torch.equal(a, b)
    assert (
        full.trained_ids[len(full.trained_ids) - len(resumed.trained_ids) :] == resumed.trained_ids
    )


def test_data_wait_is_logged_every_step(stream_server, tmp_path):
    fit(stream_server.url, tmp_path, steps=8)
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    waits = [float(r["perf/data_wait_s"]) for r in rows if r.get("perf/data_wait_s")]
    assert len(waits) >= 6 and all(w >= 0 for w in waits)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_real_ddp_ranks_train_disjoint_samples_and_stop_together(tmp_path, workers):
    overrides = ["end.max_samples=300", f"hydra.run.dir={tmp_path / 'server'}"]
    with ServerProcess(overrides) as server:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "helpers" / "ddp_stream_check.py"),
            server.url,
            str(workers),
            str(tmp_path),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 10, "every rank trains the same number of steps"
    ids = ranks[0]["ids"] + ranks[1]["ids"]
    assert len(ids) == len(set(ids)), "no sample is trained twice"
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"])


def test_metrics_are_logged_at_the_global_step_and_mfu_never_above_one(
    stream_server, tmp_path, caplog
):
    runs = {}
    for peak in (1.0, 1e15):  # a peak far too low: every step would "beat" it
        run = tmp_path / f"peak-{peak:g}"
        dm, model = small_gpt(stream_server.url, run)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=5,
            callbacks=[ThroughputMonitor(peak)],
            logger=CSVLogger(run / "logs"),
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            log_every_n_steps=1,
            enable_checkpointing=False,
        )
        with caplog.at_level(logging.WARNING, logger="streamgpt"):
            trainer.fit(model, datamodule=dm)
        with open(next((run / "logs").rglob("metrics.csv"))) as f:
            runs[peak] = list(csv.DictReader(f))
    rows = runs[1e15]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [1, 2, 3, 4, 5]
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    assert len(mfu) == 4 and all(0 < m < 1 for m in mfu)  # from step 2: step 1 has no wait
    assert not any(r.get("perf/mfu") for r in runs[1.0])
    assert caplog.text.count("above the peak") == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("stream-consumer")]
