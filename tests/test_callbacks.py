"""What the researcher sees: samples, the loss curve, checkpoints (written atomically)."""

from __future__ import annotations

import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from streamgpt.callbacks import LossCurve, SampleGenerations, StepCheckpoint
from streamgpt.checkpoint_io import AtomicCheckpointIO
from streamgpt.lit_module import GPTModule

from .helpers.tiny_lm import small_gpt

PROMPTS = ["This movie is the most", "Steven"]


@pytest.fixture(scope="module")
def trained(stream_server, tmp_path_factory):
    """A real 12-step fit from the stream with every callback on."""
    run = tmp_path_factory.mktemp("run")
    dm, model = small_gpt(stream_server.url, run)
    callbacks = [
        SampleGenerations(
            run, dm.tokenizer, dm.eos_id, every=5, prompts=PROMPTS, n_auto=2, max_new_tokens=20
        ),
        LossCurve(run, every=5),
        StepCheckpoint(run / "checkpoints", every=10, n_saved=1, validation=True),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=12,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        limit_val_batches=3,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=dm)
    return run, trainer, model


def test_samples_are_written_every_n_steps_and_at_the_end(trained):
    run, trainer, model = trained
    texts = {}
    for step in (5, 10, 12):
        folder = run / "samples" / f"iter_{step}"
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["auto_0.txt", "auto_1.txt", "manual_0.txt", "manual_1.txt"]
        for name in names:
            texts[step, name] = (folder / name).read_text()
        for i, prompt in enumerate(PROMPTS):
            text = texts[step, f"manual_{i}.txt"]
            assert text.startswith(prompt) and len(text) > len(prompt), (step, text)
        assert texts[step, "auto_0.txt"] != texts[step, "auto_1.txt"]
    assert texts[5, "manual_0.txt"] != texts[12, "manual_0.txt"], "the model trained in between"
    # Seeded per sample: the final model samples exactly the same texts again.
    sampler = next(c for c in trainer.callbacks if isinstance(c, SampleGenerations))
    again = sampler.sample(trainer, model)
    assert [(kind, text) for _, kind, _, text in again] == [
        (kind, texts[12, f"{kind}_{i}.txt"])
        for kind, i in [("manual", 0), ("manual", 1), ("auto", 0), ("auto", 1)]
    ]


def test_the_loss_curve_is_a_real_png(trained):
    run, _, curve_owner = trained
    path = run / "training_curve_LOSS.png"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400
    curve = next(c for c in curve_owner.trainer.callbacks if isinstance(c, LossCurve))
    assert len(curve.train) >= 10 and [s for s, _, _ in curve.val] == [5, 10]


def test_checkpoints_keep_the_best_plus_last_and_load(trained):
    run, _, _ = trained
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in files and any(f.startswith("step=0000010-val_loss=") for f in files)
    assert not any(f.endswith(".tmp") for f in files)
    # The run ended at step 12, between checkpoint steps: last.ckpt is what it ended with, and
    # not ranked (step 12 was not validated).
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and not any(f.startswith("step=0000012") for f in files)
    loaded = GPTModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert loaded.hparams.model["vocab_size"] % 64 == 0


def test_validation_logs_bits_per_byte_and_checkpoints_do_not_keep_the_byte_table(trained):
    run, trainer, _ = trained
    loss, bpb = (
        float(trainer.callback_metrics["val/loss"]),
        float(trainer.callback_metrics["val/bpb"]),
    )
    # Tokens of this vocabulary average well over one byte: fewer bits per byte than per token.
    assert math.isfinite(bpb) and 0 < bpb < loss / math.log(2)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [k for k in state["state_dict"] if "token_bytes" in k]


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    class Explodes:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    big = {"state_dict": {"w": torch.zeros(1 << 20)}, "boom": Explodes()}
    with pytest.raises((RuntimeError, pickle.PicklingError)):
        io.save_checkpoint(big, path)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["state_dict"]["w"].sum() == 3


def test_generate_script_samples_from_a_run_and_refuses_a_truncated_checkpoint(trained, tmp_path):
    run, _, _ = trained
    script = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    cmd = [sys.executable, str(script), str(run), "--prompt", "Steven", "--max-new-tokens", "15"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Steven") and len(done.stdout) > len("Steven\n")
    assert "last.ckpt" in done.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.stdout == done.stdout, "seeded"
    broken = tmp_path / "checkpoints" / "broken.ckpt"
    broken.parent.mkdir()
    broken.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    shutil.copy(run / "tokenizer.json", tmp_path / "tokenizer.json")
    failed = subprocess.run(
        [sys.executable, str(script), str(broken)], capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert f"error: {broken} is truncated or corrupt" in failed.stderr
    assert "Traceback" not in failed.stderr
