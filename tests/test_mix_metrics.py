"""Training on `source=mix`: the tokens trained from each component (data/tokens/<component>),
validation per component (val/loss/<component>, val/bpb/<component>), and a finite mixture ending
a DDP run on the same step on both ranks.

Two `files` corpora, "plays" (weight 0.8) and "notes" (0.2), on real servers; the real
tokenizer; real Trainers. Expected figures are computed here from what the server serves, not
from what the trainer reports.
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import orjson
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from streamgpt.bpb import LN2, token_byte_lengths
from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.data.packing import Encoder, TokenPacker
from streamgpt.endings import StreamEndSync
from streamgpt.lit_module import GPTModule
from streamgpt.monitors import MixtureTokens
from streamgpt.server import StreamServer
from streamgpt.server.config import ServeConfig, validate
from streamgpt.server.corpus import Chunking
from streamgpt.server.process import ServerProcess
from streamgpt.server.sources import build_corpus

from .helpers.corpora import plays_and_notes, text
from .helpers.runs import batches, train
from .helpers.servers import Client, RunningServer, stream_cfg

EOS = "<|endoftext|>"


def write_corpus(folder: Path, documents: int, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(documents):
        (folder / f"{folder.name}{i}.txt").write_text(text(rng, words))
    return folder


def component(sample_id: str) -> str:
    return sample_id.split("/", 1)[0]


def read_stream(url: str, consumer: dict, n: int) -> list[tuple[str, str]]:
    """What the server serves `consumer`: (id, text) in order, up to n or to the stream's end."""
    c = Client(url)
    c.handshake(consumer)
    out: list[tuple[str, str]] = []
    try:
        while len(out) < n:
            payload = c.data(64)["payload"]
            if payload == ["terminate"]:
                break
            out += [(s["sample_id"], next(iter(s["inputs"].values()))) for s in payload]
    finally:
        c.close()
    return out


def tokens_by_component(samples: list[tuple[str, str]], tokenizer: Tokenizer, n: int) -> Counter:
    """The components of the first n tokens of a stream: every token is its sample's."""
    encode = Encoder(tokenizer, EOS, EOS)
    labels: list[str] = []
    for (sample_id, _), ids in zip(samples, encode([t for _, t in samples]), strict=True):
        labels += [component(sample_id)] * len(ids)
        if len(labels) >= n:
            break
    assert len(labels) >= n, "read more of the stream"
    return Counter(labels[:n])


# -- the packer ---------------------------------------------------------------------------------


def test_the_packer_gives_every_token_of_a_batch_to_its_sample_across_batches_and_a_resume():
    rng = random.Random(0)
    samples = [(f"{rng.choice(['plays', 'notes'])}/d{i}#0", rng.randint(1, 40)) for i in range(60)]
    labels = [component(s) for s, n in samples for _ in range(n)]
    packer = TokenPacker(2, 8)
    got: list[dict[str, int]] = []
    for i, (sample_id, n) in enumerate(samples):
        packer.add([sample_id], [list(range(n))])
        while packer.ready():
            got.append(packer.components())
            packer.pop()
        if i == 30:  # a checkpoint and a resume mid-sample, in a fresh packer
            packer = TokenPacker(2, 8, packer.state())
    assert len(got) > 10
    for b, counts in enumerate(got):
        assert counts == Counter(labels[16 * b : 16 * (b + 1)]), f"batch {b}"


def test_a_packer_state_saved_before_the_sample_in_progress_was_kept_still_loads():
    packer = TokenPacker(1, 4)
    packer.add(["plays/a#0", "notes/b#0"], [[1, 2, 3], [4, 5, 6, 7, 8, 9]])
    packer.pop()
    assert TokenPacker(1, 4, packer.state()).components() == {"notes": 4}
    old = {k: v for k, v in packer.state().items() if k != "current"}
    resumed = TokenPacker(1, 4, old)
    assert resumed.components() == {"": 4}, "whose tokens they are, the old state did not say"
    x, _, _ = resumed.pop()
    assert x.tolist() == [[5, 6, 7, 8]]


# -- a run on a mixture, in this process ----------------------------------------------------------


def mixture(tmp_path: Path):
    """plays (0.8): documents of 150 words, 2 held out for validation; notes (0.2): documents of
    12 words, 1 held out: fewer validation tokens than one window of 33."""
    plays = write_corpus(tmp_path / "plays", 24, words=150, seed=1)
    notes = write_corpus(tmp_path / "notes", 40, words=12, seed=2)
    source = plays_and_notes(plays, notes, validation=(2, 1))
    cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), {"source": source})
    cfg.chunk.words = 16
    validate(cfg)
    return build_corpus(cfg.source, Chunking(words=16))


def fit_on_mixture(
    url: str, run: Path, steps: int, ckpt_path: Path | None = None
) -> tuple[StreamDataModule, GPTModule]:
    dm = StreamDataModule(stream_cfg(url, valid_size=64), TokenizerConfig(vocab_size=512), run)
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(0)
    model = GPTModule(
        {"context": 32, "d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 512},
        {"name": "adamw", "lr": 3e-3, "warmup_steps": 2},
    )
    model.set_token_bytes(token_byte_lengths(dm.tokenizer))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[StreamEndSync(dm), MixtureTokens(dm)],
        logger=CSVLogger(run / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        val_check_interval=steps,  # validation of the final weights
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(run / "last.ckpt")
    return dm, model


def metrics(run: Path) -> list[dict[str, float]]:
    with open(next(run.rglob("metrics.csv"))) as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def last(rows: list[dict[str, float]], key: str) -> dict[str, float]:
    return [r for r in rows if key in r][-1]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A server of the mixture in this process, and 6 steps of a small GPT on it, validated at
    the end: (server, run folder, datamodule, model, the data module's warnings)."""
    tmp = tmp_path_factory.mktemp("mixture")
    server = RunningServer(StreamServer(mixture(tmp), port=0))
    warnings = Lines()
    logging.getLogger("streamgpt.data").addHandler(warnings)
    try:
        dm, model = fit_on_mixture(server.url, tmp / "run", steps=6)
        yield server, tmp / "run", dm, model, "\n".join(warnings.lines)
    finally:
        logging.getLogger("streamgpt.data").removeHandler(warnings)
        server.stop()


def test_data_tokens_per_component_are_the_tokens_trained_from_each(mixture_run):
    server, run, dm, _, _ = mixture_run
    rows = metrics(run)
    consumer = {"rank": 0, "world_size": 1, "worker": 0, "num_workers": 1, "seed": 0}
    served = read_stream(server.url, {**consumer, "epoch": 0, "split": "train"}, 400)
    want = tokens_by_component(served, dm.tokenizer, 6 * 4 * 32)  # steps x batch x max_length
    row = last(rows, "data/tokens/plays")
    assert (row["data/tokens/plays"], row["data/tokens/notes"]) == (want["plays"], want["notes"])
    for row in rows:
        if "data/tokens/plays" in row:
            assert row["data/tokens/plays"] + row["data/tokens/notes"] == row["tokens_seen"]
            share = row["data/tokens/plays"] / row["tokens_seen"]
            assert row["data/token_share/plays"] == pytest.approx(share)
    assert 0.6 < last(rows, "data/token_share/plays")["data/token_share/plays"] < 0.95


def test_a_resumed_run_continues_the_token_counts_of_the_run(mixture_run, tmp_path):
    server, run, _, _, _ = mixture_run
    part = tmp_path / "part"
    fit_on_mixture(server.url, part, steps=3)
    fit_on_mixture(server.url, part, steps=6, ckpt_path=part / "last.ckpt")
    want = last(metrics(run), "data/tokens/plays")
    got = last(metrics(part / "logs" / "lightning_logs" / "version_1"), "data/tokens/plays")
    for key in ("data/tokens/plays", "data/tokens/notes", "tokens_seen"):
        assert got[key] == want[key], key


def test_val_loss_and_bpb_per_component_are_those_of_its_own_windows(mixture_run):
    _, run, dm, model, _ = mixture_run
    row = last(metrics(run), "val/loss/plays")
    samples = [orjson.loads(line) for line in (run / "validation.jsonl").read_bytes().splitlines()]
    plays = [s["text"] for s in samples if component(s["id"]) == "plays"]
    tokens = np.concatenate(Encoder(dm.tokenizer, EOS, EOS)(plays))
    n = (len(tokens) - 1) // 32
    windows = torch.from_numpy(np.stack([tokens[32 * i : 32 * i + 33] for i in range(n)]))
    x, y = windows[:, :-1].long(), windows[:, 1:].long()
    model.eval()
    with torch.no_grad():
        logits, _ = model(x)  # logits: no targets (model.loss_chunk returns none with them)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    nbytes = token_byte_lengths(dm.tokenizer)[y.flatten()]
    assert row["val/loss/plays"] == pytest.approx(nll.mean().item(), rel=1e-4)
    bpb = (nll * (nbytes > 0)).sum().item() / (LN2 * nbytes.sum().item())
    assert row["val/bpb/plays"] == pytest.approx(bpb, rel=1e-4)
    # val/loss is still the mean over every validation window: the components' own, and the
    # components' tails packed together.
    with torch.no_grad():
        all_logits, _ = model(dm.val_x)
    overall = F.cross_entropy(all_logits.flatten(0, 1), dm.val_y.flatten()).item()
    assert row["val/loss"] == pytest.approx(overall, rel=1e-4)
    assert len(dm.val_x) > n, "the tails are validated too"


def test_a_component_with_less_than_a_window_of_validation_gets_no_metric_and_a_warning(
    mixture_run,
):
    _, run, dm, _, logged = mixture_run
    keys = set().union(*metrics(run))
    assert "val/loss/plays" in keys and "val/bpb/plays" in keys
    assert not {k for k in keys if k.endswith("/notes") and k.startswith("val/")}
    assert "mixture component(s) notes hold fewer than max_length+1" in logged
    assert dm.val_components == ["plays"]


# -- a finite mixture on 2 ranks, through train.py -------------------------------------------------


@pytest.mark.slow
def test_a_finite_mixture_ends_a_ddp_run_on_the_same_step_with_every_components_tokens(tmp_path):
    plays = write_corpus(tmp_path / "plays", 40, words=120, seed=1)
    notes = write_corpus(tmp_path / "notes", 20, words=120, seed=2)
    server_options = [
        "source=mix",
        f"+source.components.plays={{source: {{name: files, paths: [{plays}], "
        "validation_docs: 1}, weight: 0.8}",
        f"+source.components.notes={{source: {{name: files, paths: [{notes}], "
        "validation_docs: 1}, weight: 0.2}",
        "chunk.words=16",
        "end.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'server'}",
    ]
    run = tmp_path / "run"
    with ServerProcess(server_options) as server:
        served = []
        for rank in (0, 1):
            consumer = {"rank": rank, "world_size": 2, "worker": 0, "num_workers": 1}
            served.append(read_stream(server.url, consumer, 10**6))
        done = train(
            run,
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            f"data.stream.url={server.url}",
            "trainer.max_steps=100000",
            "trainer.val_every=4",
            "data.stream.valid_size=32",
            "callbacks.sample_every=0",
            "callbacks.checkpoint_every=0",
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the server ended the stream" in done.stdout + done.stderr
    steps = [sorted(batches(run, r)) for r in (0, 1)]
    assert steps[0] == steps[1] == list(range(1, len(steps[0]) + 1)) and len(steps[0]) > 4
    trained = len(steps[0])
    # The shorter stream had no full batch left: the stream ended the run, not max_steps.
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    encode = Encoder(tokenizer, EOS, EOS)
    per_step = 8 * 64  # SMALL: batch_size x model.context
    lengths = [sum(map(len, encode([t for _, t in s]))) for s in served]
    assert min(lengths) < (trained + 1) * per_step + 1
    want = sum((tokens_by_component(s, tokenizer, trained * per_step) for s in served), Counter())
    rows = metrics(run)
    row = last(rows, "data/tokens/plays")
    assert row["step"] == trained
    assert (row["data/tokens/plays"], row["data/tokens/notes"]) == (want["plays"], want["notes"])
    assert row["data/tokens/plays"] + row["data/tokens/notes"] == row["tokens_seen"]
    keys = set().union(*rows)
    assert {"val/loss/plays", "val/bpb/plays", "val/loss/notes", "val/bpb/notes"} <= keys
