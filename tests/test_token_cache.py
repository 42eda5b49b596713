"""The token cache (server/token_cache.py): a corpus is tokenized once per tokenizer, into files
that later epochs, restarted servers and other servers on the same folder read instead of
tokenizing, and the frames they serve are the bytes a server tokenizing on the fly sends."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from streamgpt.data.packing import Encoder
from streamgpt.data.token_frame import read_frame
from streamgpt.data.tokenizer import train_bpe
from streamgpt.server import StreamServer
from streamgpt.server.config import FilesSourceConfig, ServeConfig, validate
from streamgpt.server.corpus import Chunking
from streamgpt.server.process import ServerProcess
from streamgpt.server.sources import build_corpus
from streamgpt.server.token_cache import Part, TokenCache, entry_key

from .helpers.corpora import plays_and_notes, small_corpus, write_corpus
from .helpers.servers import Client, RunningServer

EOS = "<|endoftext|>"
CONSUMER = {"rank": 0, "world_size": 1, "seed": 3}
WORDS = 64  # chunk.words: a document of 150-450 words is 3 to 8 samples
FRAMES, BATCH = 20, 16  # 320 samples: more than two epochs of the ~120 training samples


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def corpus_texts(folder: Path) -> list[str]:
    return [p.read_text() for p in sorted(folder.glob("*.txt"))]


class TokenReader:
    """A consumer in token mode on a raw connection; uploads its tokenizer if asked to (`upload`),
    else requires the server to know it already."""

    def __init__(self, url: str, tokenizer: str, consumer: dict = CONSUMER, upload=True) -> None:
        tokens = {"tokenizer": sha(tokenizer), "eos_token": EOS}
        hello = {"type": "handshake", "version": "1.0", "consumer": {**consumer, "tokens": tokens}}
        self.client = Client(url)
        reply = self.client.ask(hello)
        if upload and reply["type"] == "error" and "unknown_tokenizer" in reply["payload"]:
            uploader = Client(url)
            uploader.handshake()
            put = {"sha256": sha(tokenizer), "tokenizer_json": tokenizer}
            assert uploader.ask({"type": "putTokenizer", "payload": put})["type"] != "error"
            uploader.close()
            self.client = Client(url)
            reply = self.client.ask(hello)
        assert reply["type"] == "handshake", reply

    def frames(self, n: int = FRAMES, batch: int = BATCH) -> list[bytes]:
        out = []
        for _ in range(n):
            self.client.send({"type": "getData", "payload": {"batch_size": batch}})
            frame = self.client.ws.recv(30)
            assert isinstance(frame, bytes), frame
            out.append(frame)
        self.client.close()
        return out


def token_status(url: str) -> dict:
    c = Client(url)
    c.handshake()
    status = c.ask({"type": "status", "payload": {}})["payload"]["token_cache"]
    c.close()
    return status


def wait_ready(url: str, entries: int = 1, timeout: float = 60) -> dict:
    """The token cache's status once `entries` entries are ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = token_status(url)
        ready = [e for e in status["entries"] if e["state"] == "ready"]
        if len(ready) >= entries:
            return status
        time.sleep(0.1)
    raise AssertionError(f"no {entries} ready entries in {timeout} s: {status}")


def files_server(corpus: Path, cache: Path, log: Path, *more: str) -> ServerProcess:
    overrides = [
        "source=files",
        f"source.paths=[{corpus}]",
        "source.validation_docs=2",
        f"chunk.words={WORDS}",
        f"tokens.cache_dir={cache}",
        "log_every_s=3600",
        f"hydra.run.dir={log.parent / log.stem}",
        *more,
    ]
    return ServerProcess(overrides, log_file=log)


def entries(cache: Path) -> dict[str, dict]:
    """The entries in a cache folder: meta.json by folder name."""
    return {m.parent.name: json.loads(m.read_text()) for m in cache.glob("*/meta.json")}


def sizes(cache: Path) -> list[int]:
    """The bytes of each entry in a cache folder."""
    return [sum(f.stat().st_size for f in (cache / name).iterdir()) for name in entries(cache)]


def built_lines(*logs: Path) -> list[str]:
    return [line for log in logs for line in log.read_text().splitlines() if "cache: built" in line]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus") / "docs"
    small_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(corpus) -> str:
    return train_bpe(corpus_texts(corpus), 300, 2, EOS, "<|pad|>").to_str()


@pytest.fixture(scope="module")
def on_the_fly(corpus, tokenizer, tmp_path_factory):
    """What a server without the cache does: its frames (the reference), status and folder."""
    tmp = tmp_path_factory.mktemp("on-the-fly")
    folder = tmp / "cache"
    with files_server(corpus, folder, tmp / "server.log", "tokens.cache=false") as server:
        frames = TokenReader(server.url, tokenizer).frames()
        status = token_status(server.url)
    return frames, status, folder


@pytest.fixture(scope="module")
def built(corpus, tokenizer, tmp_path_factory):
    """A cache folder where a server built the corpus's entry, and what that server served."""
    tmp = tmp_path_factory.mktemp("built")
    with files_server(corpus, tmp / "cache", tmp / "server.log") as server:
        reader = TokenReader(server.url, tokenizer)
        wait_ready(server.url)
        frames = reader.frames()
        status = token_status(server.url)
    return tmp / "cache", frames, status, tmp / "server.log"


def test_frames_from_a_ready_cache_are_the_bytes_tokenized_on_the_fly_over_two_epochs(
    built, on_the_fly
):
    cache, frames, status, log = built
    assert frames == on_the_fly[0]
    assert read_frame(frames[-1]).cursor["epoch"] >= 2
    assert (status["samples_from_cache"], status["samples_tokenized"]) == (FRAMES * BATCH, 0)
    (entry,) = status["entries"]
    assert entry["state"] == "ready" and entry["corpus"] == "files" and entry["tokens"] > 0
    (meta,) = entries(cache).values()
    assert meta["tokens"] == entry["tokens"] and meta["documents"] == 24
    assert len(built_lines(log)) == 1


def test_without_the_cache_nothing_is_written_and_every_sample_is_tokenized(on_the_fly):
    _, status, folder = on_the_fly
    assert not folder.exists()
    assert (status["samples_from_cache"], status["samples_tokenized"]) == (0, FRAMES * BATCH)
    assert status["dir"] is None and [e["state"] for e in status["entries"]] == ["on the fly"]


def test_a_second_server_on_the_cache_knows_the_tokenizer_and_tokenizes_nothing(
    built, corpus, tokenizer, on_the_fly, tmp_path
):
    cache, *_ = built
    with files_server(corpus, cache, tmp_path / "server.log") as server:
        reader = TokenReader(server.url, tokenizer, upload=False)  # no unknown_tokenizer
        wait_ready(server.url)
        frames = reader.frames()
        status = token_status(server.url)
    assert frames == on_the_fly[0]
    assert (status["samples_from_cache"], status["samples_tokenized"]) == (FRAMES * BATCH, 0)
    assert built_lines(tmp_path / "server.log") == []


def test_a_truncated_entry_is_detected_deleted_and_rebuilt_and_never_served(
    built, corpus, tokenizer, on_the_fly, tmp_path
):
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    (name,) = entries(cache)
    tokens = cache / name / "tokens.bin"
    size = tokens.stat().st_size
    with tokens.open("r+b") as f:
        f.truncate(size // 2)
    log = tmp_path / "server.log"
    with files_server(corpus, cache, log) as server:
        reader = TokenReader(server.url, tokenizer, upload=False)
        wait_ready(server.url)
        frames = reader.frames()
    assert frames == on_the_fly[0]
    said = log.read_text()
    assert f"{cache / name} is damaged (tokens.bin is {size // 2} bytes" in said
    assert len(built_lines(log)) == 1 and tokens.stat().st_size == size


def test_another_tokenizer_or_an_edited_document_gets_an_entry_of_its_own(
    built, corpus, tokenizer, tmp_path
):
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    (first,) = entries(cache)
    other = train_bpe(corpus_texts(corpus), 270, 2, EOS, "<|pad|>").to_str()  # fewer merges
    with files_server(corpus, cache, tmp_path / "a.log") as server:
        TokenReader(server.url, other)
        wait_ready(server.url)
    assert len(entries(cache)) == 2
    edited = tmp_path / "edited"
    shutil.copytree(corpus, edited)
    doc = edited / "doc05.txt"
    doc.write_text(doc.read_text().replace("w5x3 ", "w5x3 river ", 1))  # same key, new text
    with files_server(edited, cache, tmp_path / "b.log") as server:
        reader = TokenReader(server.url, tokenizer, upload=False)
        wait_ready(server.url)
        frames = reader.frames(12)
        text = Client(server.url)
        text.handshake(CONSUMER)
        samples = [s for _ in range(12) for s in text.data(BATCH)["payload"]]
        text.close()
    assert len(entries(cache)) == 3 and first in entries(cache)
    got = [t.tolist() for frame in frames for t in read_frame(frame).tokens]
    encode = Encoder(Tokenizer.from_str(tokenizer), EOS, EOS)
    want = encode([next(iter(s["inputs"].values())) for s in samples])
    assert got == want and any("river" in s["inputs"]["text_output"] for s in samples)


def mixture(source: dict):
    cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), {"source": source})
    validate(cfg)
    return build_corpus(cfg.source, Chunking(words=16))


def cached_and_on_the_fly(corpus, cache: Path) -> tuple[RunningServer, RunningServer]:
    cached = RunningServer(StreamServer(corpus, port=0, token_cache=TokenCache(cache)))
    return cached, RunningServer(StreamServer(corpus, port=0))


def test_a_mixtures_components_are_served_from_their_own_entries(tokenizer, tmp_path):
    plays, notes = write_corpus(tmp_path / "plays", 12, 1), write_corpus(tmp_path / "notes", 6, 2)
    cached, fly = cached_and_on_the_fly(mixture(plays_and_notes(plays, notes, (1, 1))), tmp_path)
    try:
        reader = TokenReader(cached.url, tokenizer)
        status = wait_ready(cached.url, entries=2)
        assert sorted(e["corpus"] for e in status["entries"]) == ["notes", "plays"]
        frames = reader.frames()
        assert frames == TokenReader(fly.url, tokenizer).frames()
        ids = [i for frame in frames for i in read_frame(frame).ids]
        assert {i.split("/")[0] for i in ids} == {"plays", "notes"}
        status = token_status(cached.url)
        assert (status["samples_from_cache"], status["samples_tokenized"]) == (len(ids), 0)
    finally:
        cached.stop()
        fly.stop()


def test_a_sharded_component_is_tokenized_as_it_arrives_in_the_frames_of_a_cached_one(
    tokenizer, fineweb_files, tmp_path
):
    plays = write_corpus(tmp_path / "plays", 12, 1)
    source = plays_and_notes(plays, plays, (1, 1))
    source["components"]["notes"]["source"] = {
        "name": "fineweb",
        "path": "parquet",
        "config_name": None,
        "data_files": [str(p) for p in fineweb_files],
    }
    cached, fly = cached_and_on_the_fly(mixture(source), tmp_path)
    try:
        reader = TokenReader(cached.url, tokenizer)
        status = wait_ready(cached.url)
        states = {e["corpus"]: e["state"] for e in status["entries"]}
        assert states == {"plays": "ready", "notes": "on the fly"}
        frames = reader.frames()
        assert frames == TokenReader(fly.url, tokenizer).frames()
        ids = [i for frame in frames for i in read_frame(frame).ids]
        notes = sum(i.startswith("notes/") for i in ids)
        status = token_status(cached.url)
        assert 0 < notes < len(ids)
        assert (status["samples_from_cache"], status["samples_tokenized"]) == (
            len(ids) - notes,
            notes,
        )
    finally:
        cached.stop()
        fly.stop()


def test_two_servers_waiting_for_one_entry_build_it_once_and_both_serve_it(
    corpus, tokenizer, on_the_fly, tmp_path
):
    cache = tmp_path / "cache"
    cache.mkdir()
    files = FilesSourceConfig(paths=[str(corpus)], validation_docs=2)
    fingerprint = Part("files", build_corpus(files, Chunking(words=WORDS))).fingerprint()
    lock = cache / f"{entry_key(fingerprint, sha(tokenizer), EOS, None, 'uint16')}.lock"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    servers = [files_server(corpus, cache, log).launch() for log in logs]
    try:
        for server in servers:
            server.wait_ready()
        # The test holds the entry's lock first, so that both servers find it being built
        # whatever the speed of this machine; then lets them race for it.
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            TokenReader(servers[0].url, tokenizer, upload=True).client.close()
            readers = [TokenReader(s.url, tokenizer, upload=False) for s in servers]
            for server in servers:
                status = token_status(server.url)
                assert [e["state"] for e in status["entries"]] == ["on the fly"]
            deadline = time.monotonic() + 30
            while sum("another server is building" in log.read_text() for log in logs) < 2:
                assert time.monotonic() < deadline, "a server did not wait for the lock"
                time.sleep(0.1)
        for server, reader in zip(servers, readers, strict=True):
            wait_ready(server.url)
            assert reader.frames() == on_the_fly[0]
    finally:
        for server in servers:
            server.stop()
    assert len(built_lines(*logs)) == 1 and len(entries(cache)) == 1


def test_eviction_keeps_the_cache_under_its_size_deleting_the_least_recently_used(
    corpus, tokenizer, tmp_path
):
    """Three tokenizers that tokenize alike (one JSON, spaced three ways): entries of one size."""
    spaced = [json.dumps(json.loads(tokenizer), indent=n) for n in (1, 2, 3)]
    files = FilesSourceConfig(paths=[str(corpus)], validation_docs=2)
    served = build_corpus(files, Chunking(words=WORDS))
    cache = tmp_path / "cache"

    def build_with(text: str, max_bytes: int) -> None:
        server = StreamServer(served, port=0, token_cache=TokenCache(cache, max_bytes))
        running = RunningServer(server)
        try:
            TokenReader(running.url, text).client.close()
            wait_ready(running.url)
        finally:
            running.stop()

    build_with(spaced[0], 1 << 40)
    time.sleep(0.05)
    build_with(spaced[1], 1 << 40)
    limit = max(sizes(cache)) * 5 // 2  # room for two entries, not three
    time.sleep(0.05)
    build_with(spaced[2], limit)
    kept = sorted(meta["tokenizer"] for meta in entries(cache).values())
    assert kept == sorted(sha(t) for t in spaced[1:])
    assert sum(sizes(cache)) <= limit


def test_a_kept_tokenizer_that_fails_its_checksum_is_not_used_and_is_uploaded_again(
    corpus, tokenizer, tmp_path
):
    files = FilesSourceConfig(paths=[str(corpus)], validation_docs=2)
    cache = TokenCache(tmp_path / "cache")
    kept = tmp_path / "cache" / "tokenizers" / f"{sha(tokenizer)}.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(tokenizer.replace('"w', '"v', 1))
    server = RunningServer(StreamServer(build_corpus(files, Chunking()), port=0, token_cache=cache))
    try:
        c = Client(server.url)
        hello = {"consumer": {"tokens": {"tokenizer": sha(tokenizer), "eos_token": EOS}}}
        reply = c.ask({"type": "handshake", "version": "1.0", **hello})
        assert reply["payload"]["unknown_tokenizer"] == sha(tokenizer)
        TokenReader(server.url, tokenizer).client.close()
        assert kept.read_text() == tokenizer
    finally:
        server.stop()
