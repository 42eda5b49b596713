"""Tokens on the wire in a real Trainer: the same batches as text, bit for bit, first step to last,
across a resume from a checkpoint and across server restarts mid-run (each new server gets the
tokenizer uploaded again)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import lightning as L
import orjson
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from tokenizers import Tokenizer

from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.data.client import put_tokenizer_request
from streamgpt.data.config import ElasticConfig
from streamgpt.server import StreamServer
from streamgpt.server.config import LimitsConfig
from streamgpt.server.token_cache import TokenCache

from .helpers.core_server import CoreOnlyServer
from .helpers.runs import train
from .helpers.servers import RunningServer, stream_cfg
from .helpers.tiny_lm import TinyLM

STEPS = 24


@pytest.fixture(scope="module")
def server(shakespeare):
    running = RunningServer(StreamServer(shakespeare, port=0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tokenizer(server, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tokenizer")
    StreamDataModule(stream_cfg(server.url), TokenizerConfig(vocab_size=512), run).prepare_data()
    return run / "tokenizer.json"


def fit(url, run: Path, tokenizer: Path, *, tokens: bool, ckpt_path=None, every=None, **options):
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "tokenizer.json").exists():
        shutil.copy(tokenizer, run / "tokenizer.json")
    callbacks = options.pop("callbacks", [])
    # 16 x 32 tokens a batch: a sample lasts a batch or two, so a run reads many of them.
    cfg = stream_cfg(url, batch_size=16, log_batches=True, tokens_on_wire=tokens, **options)
    dm = StreamDataModule(cfg, TokenizerConfig(vocab_size=512), run)
    checkpoints = (
        [ModelCheckpoint(dirpath=run / "ckpt", every_n_train_steps=every, save_top_k=-1)]
        if every
        else []
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=[*checkpoints, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(every),
    )
    torch.manual_seed(0)
    model = TinyLM()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def batch_log(run: Path) -> list[bytes]:
    return (run / "batches-rank0.jsonl").read_bytes().splitlines()


@pytest.fixture(scope="module")
def text_run(server, tokenizer, tmp_path_factory):
    """The reference: a run on text, as every run was before tokens on the wire."""
    run = tmp_path_factory.mktemp("text")
    return fit(server.url, run, tokenizer, tokens=False), run


def assert_same_batches(got: TinyLM, want: TinyLM) -> None:
    assert len(got.trained_x) == len(want.trained_x)
    for step, (a, b) in enumerate(zip(got.trained_x, want.trained_x, strict=True)):
        assert torch.equal(a, b), f"batch {step} differs"
    assert got.trained_ids == want.trained_ids


def test_a_run_on_tokens_trains_the_same_batches_as_a_run_on_text(
    server, tokenizer, text_run, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="streamgpt.server")
    text, text_dir = text_run
    run = tmp_path / "tokens"
    got = fit(server.url, run, tokenizer, tokens=True)
    assert len(got.trained_x) == STEPS
    assert_same_batches(got, text)
    assert batch_log(run) == batch_log(text_dir), "the same ids and token hashes, batch by batch"
    assert any("tokens=uint16" in r.getMessage() for r in caplog.records), "it read tokens"


def test_a_run_on_tokens_from_the_servers_token_cache_trains_the_same_batches_as_text(
    shakespeare, tokenizer, text_run, tmp_path
):
    """The server's token cache (tokens.cache) is only where the ids come from: with the entry
    ready before the run starts, every frame is sliced from it and the batches are text's."""
    cache = TokenCache(tmp_path / "cache")
    running = RunningServer(StreamServer(shakespeare, port=0, token_cache=cache))
    try:
        warm = fit(running.url, tmp_path / "warm", tokenizer, tokens=True)  # starts the build
        assert_same_batches(warm, text_run[0])
        deadline = time.monotonic() + 60
        while [e["state"] for e in cache.status()["entries"]] != ["ready"]:
            assert time.monotonic() < deadline, f"the entry is not ready: {cache.status()}"
            time.sleep(0.1)
        before = cache.status()
        got = fit(running.url, tmp_path / "tokens", tokenizer, tokens=True)
        after = cache.status()
    finally:
        running.stop()
    assert_same_batches(got, text_run[0])
    assert batch_log(tmp_path / "tokens") == batch_log(text_run[1])
    assert after["samples_tokenized"] == before["samples_tokenized"], "nothing tokenized on the fly"
    assert after["samples_from_cache"] > before["samples_from_cache"], "the frames read the cache"


def test_a_run_on_tokens_resumed_from_a_checkpoint_continues_with_the_same_batches(
    server, tokenizer, text_run, tmp_path
):
    text, _ = text_run
    run = tmp_path / "part"
    fit(server.url, run, tokenizer, tokens=True, every=5)
    checkpoint = run / "ckpt" / "epoch=0-step=5.ckpt"
    resumed = fit(server.url, run, tokenizer, tokens=True, ckpt_path=checkpoint, every=5)
    assert len(resumed.trained_x) == STEPS - 5
    for a, b in zip(text.trained_x[5:], resumed.trained_x, strict=True):
        assert torch.equal(a, b)
    assert text.trained_ids[len(text.trained_ids) - len(resumed.trained_ids) :] == (
        resumed.trained_ids
    )


class RestartServer(Callback):
    """Stops the server after some batches and starts a new one (nothing held: no tokenizer) on
    the same port, while the consumer thread keeps reading ahead."""

    def __init__(self, running: RunningServer, corpus, at: tuple[int, ...]) -> None:
        self.running, self.corpus, self.at = running, corpus, at
        self.restarts = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx in self.at:
            port = self.running.server.port
            self.running.stop()
            self.running = RunningServer(StreamServer(self.corpus, port=port))
            self.restarts += 1


def test_a_run_on_tokens_survives_server_restarts_with_the_same_batches(
    shakespeare, tokenizer, text_run, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="streamgpt.server")
    text, _ = text_run
    restart = RestartServer(RunningServer(StreamServer(shakespeare, port=0)), shakespeare, (3, 12))
    try:
        # One sample per request and little read ahead: the run asks
        # each new server for data, so each needs the tokenizer uploaded again.
        got = fit(
            restart.running.url,
            tmp_path / "run",
            tokenizer,
            tokens=True,
            callbacks=[restart],
            samples_per_request=1,
            requests_in_flight=1,
            prefetch_batches=1,
        )
    finally:
        restart.running.stop()
    assert restart.restarts == 2
    assert_same_batches(got, text)
    uploads = [r for r in caplog.records if "received (vocabulary 512)" in r.getMessage()]
    assert len(uploads) == 3, "uploaded to the first server and to each restarted one"


def test_a_server_without_tokens_is_read_as_text_with_one_warning(tmp_path, caplog):
    server = CoreOnlyServer()
    caplog.set_level(logging.WARNING, logger="streamgpt.data")
    try:
        cfg = stream_cfg(server.url, valid_size=8, streaming_setup_samples=50, tokens_on_wire=True)
        dm = StreamDataModule(cfg, TokenizerConfig(vocab_size=400), tmp_path)
        dm.setup()
        loader = iter(dm.train_dataloader())
        batches = [dm.on_before_batch_transfer(next(loader), 0) for _ in range(8)]
    finally:
        dm.teardown("fit")
        server.stop()
    assert len(batches) == 8
    warnings = [r for r in caplog.records if "does not send tokens" in r.getMessage()]
    assert len(warnings) == 1 and "tokens_on_wire=true is ignored" in warnings[0].getMessage()


def test_tokens_in_worker_processes_and_canonical_streams_train_the_batches_of_text(
    server, tokenizer, tmp_path, caplog
):
    """DataLoader workers (each its own consumers) and elastic data (2 x 2 canonical streams,
    one connection each): the same batches on tokens as on text."""
    options = {"num_workers": 2, "elastic": ElasticConfig(streams=2, phases=2)}
    text = fit(server.url, tmp_path / "text", tokenizer, tokens=False, **options)
    caplog.set_level(logging.INFO, logger="streamgpt.server")
    got = fit(server.url, tmp_path / "tokens", tokenizer, tokens=True, **options)
    readers = [r for r in caplog.records if "tokens=uint16" in r.getMessage()]
    assert len(readers) >= 4, "the four canonical streams read tokens"
    assert len(got.trained_x) == STEPS
    assert_same_batches(got, text)


@pytest.mark.parametrize(
    ("limit", "why"),
    [
        ("max_tokenizer_bytes", "over its limits.max_tokenizer_bytes=1000"),
        (
            "max_frame_bytes",
            "its putTokenizer request is {request} bytes, over its limits.max_frame_bytes=1000",
        ),
    ],
    ids=["max_tokenizer_bytes", "max_frame_bytes"],
)
def test_a_tokenizer_over_the_servers_limit_stops_the_run_at_once_in_one_line(
    serve, shakespeare, tmp_path, limit, why
):
    """Not retried (the server would refuse the same upload again): with a retry budget of ten
    minutes, the run stops long before, saying why. Without the check, an upload over the frame
    limit is closed with 1009, also final."""
    server = serve(shakespeare, limits=LimitsConfig(**{limit: 1000}))
    run = tmp_path / "run"
    done = train(
        run,
        f"data.stream.url={server.url}",
        "data.stream.tokens_on_wire=true",
        "data.stream.retry.budget_s=600",
        "trainer.max_steps=2",
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    text = Tokenizer.from_file(str(run / "tokenizer.json")).to_str()
    request = len(
        orjson.dumps(put_tokenizer_request(hashlib.sha256(text.encode()).hexdigest(), text))
    )
    assert (
        f"error: tokens on the wire: the stream server at {server.url} cannot take our tokenizer, "
        f"{len(text.encode())} bytes of tokenizer.json as uploaded (compact JSON): "
        f"{why.format(request=request)}. Start the server with a larger limits.{limit} "
    ) in output
    assert "Traceback" not in output and "retrying" not in output
