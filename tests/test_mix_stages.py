"""Mixture stages from a training step in a real Lightning Trainer: the batches trained before
the step follow the first weights and the ones from it on the stage's, and a run resumed from a
checkpoint before, at or after the step trains exactly the batches of the uninterrupted run.

Two `files` corpora, `a` 0.8 and `b` 0.2, then {a: 0.2, b: 0.8} from step STEP.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.data.config import ElasticConfig
from streamgpt.server.config import ServeConfig, validate
from streamgpt.server.corpus import Chunking
from streamgpt.server.sources import build_corpus

from .helpers.corpora import write_corpus
from .helpers.runs import batches
from .helpers.servers import stream_cfg
from .helpers.tiny_lm import TinyLM

STEP = 6  # the stage's from_step
STEPS = 12
EVERY = 3  # checkpoints at steps 3 (before STEP), 6 (at it) and 9 (after it)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpora")
    source = {
        "name": "mix",
        "components": {
            name: {
                "source": {
                    "name": "files",
                    "paths": [str(write_corpus(folder / name, 30, seed))],
                    "validation_docs": 2,
                },
                "weight": weight,
            }
            for name, weight, seed in (("a", 0.8, 1), ("b", 0.2, 2))
        },
        "stages": [{"from_step": STEP, "weights": {"a": 0.2, "b": 0.8}}],
    }
    cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), {"source": source})
    validate(cfg)
    return build_corpus(cfg.source, Chunking(words=16))


def fit(
    url: str, run: Path, workers: int, accumulate: int, elastic: int, ckpt_path=None
) -> L.Trainer:
    canonical = ElasticConfig(streams=elastic, phases=2)
    cfg = stream_cfg(url, num_workers=workers, log_batches=True, elastic=canonical)
    dm = StreamDataModule(cfg, TokenizerConfig(vocab_size=512), run)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        callbacks=[ModelCheckpoint(dirpath=run / "ckpt", every_n_train_steps=EVERY, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    torch.manual_seed(0)
    trainer.fit(TinyLM(), datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def share_of_a(rows: list[dict]) -> float:
    counts = Counter(i.split("/", 1)[0] for row in rows for i in row["ids"])
    return counts["a"] / (counts["a"] + counts["b"])


# (workers, accumulate, elastic streams): one stream per consumer, or 2 x 2 canonical streams
@pytest.mark.parametrize(("workers", "accumulate", "elastic"), [(0, 1, 0), (2, 3, 0), (2, 1, 2)])
def test_a_step_stage_switches_at_its_step_and_resumes_exactly(
    serve, staged, tmp_path, workers, accumulate, elastic
):
    url = serve(staged).url
    full = tmp_path / "full"
    fit(url, full, workers, accumulate, elastic)
    trained = batches(full)
    assert sorted(trained) == list(range(1, STEPS * accumulate + 1))

    def at(steps: range) -> list[dict]:  # batch b (from 1) is trained at step (b - 1) // A
        return [row for b, row in trained.items() if (b - 1) // accumulate in steps]

    assert abs(share_of_a(at(range(STEP))) - 0.8) < 0.05
    assert abs(share_of_a(at(range(STEP, STEPS))) - 0.2) < 0.05
    assert share_of_a(at(range(STEP - 1, STEP))) >= 0.6, "the step before: the first weights"
    assert share_of_a(at(range(STEP, STEP + 1))) <= 0.4, "the stage's step: the stage's weights"

    for step in range(EVERY, STEPS, EVERY):
        run = tmp_path / f"resumed-{step}"
        run.mkdir()
        for name in ("tokenizer.json", "validation.jsonl"):
            shutil.copy(full / name, run / name)
        checkpoint = full / "ckpt" / f"epoch=0-step={step}.ckpt"
        trainer = fit(url, run, workers, accumulate, elastic, ckpt_path=checkpoint)
        assert trainer.global_step == STEPS
        again = batches(run)
        assert sorted(again) == list(range(step * accumulate + 1, STEPS * accumulate + 1))
        # (with elastic data another worker may make a batch: its consumer number differs)
        same = [{**again[b], "consumer": 0} == {**trained[b], "consumer": 0} for b in again]
        assert all(same), f"resumed at step {step}: diverged"
