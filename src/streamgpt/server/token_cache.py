"""Tokenize once: the token ids of indexed corpora on disk, memory-mapped (serve config `tokens`).

The first consumer that asks for tokens (docs/PROTOCOL.md §3.11) with a tokenizer starts a build in
a background thread: every chunk of every document of each indexed corpus (shakespeare, files, and
such components of a mixture) is tokenized with the `tokenizers` library's batch encoder (Rust, on
every core, outside the event loop) exactly as a token frame tokenizes it, and written to an entry
of the cache folder. Until the entry is ready the server tokenizes on the fly; once it is, a token
frame is slices of a memory-mapped file, so later epochs and later runs (a restarted server, another
server on the same folder) tokenize nothing. Sharded corpora (fineweb) are not cached: too large to
index, they are read from their source as the streams reach them, and each sample is tokenized as it
arrives, in the frame that carries it.

An entry is keyed by everything its ids depend on: the corpus's keys and texts, its chunking and id
prefix, the tokenizer's sha256, the eos token and the marker it replaces, the dtype and the entry
format. Its files (server/token_entry.py) are written by the one server that holds its lock, so a
folder shared by several servers holds each entry once. Uploaded tokenizers are kept beside the
entries, in <cache_dir>/tokenizers/ (server/tokens.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamgpt.server.corpus import CHUNKING_VERSION, IndexedCorpus
from streamgpt.server.mixture import MixCorpus
from streamgpt.server.token_entry import (
    CACHE_FORMAT,
    DamagedEntry,
    Ready,
    build,
    remove,
    try_lock,
)

if TYPE_CHECKING:
    from streamgpt.server.tokens import TokenMode

log = logging.getLogger("streamgpt.server")

_RECHECK_S = 1.0  # how often a server waits for an entry that another server is building


def entry_key(fingerprint: str, digest: str, eos: str, replace: str | None, dtype: str) -> str:
    """An entry's name: a digest of everything its ids depend on (the corpus's `fingerprint`)."""
    recipe = (CACHE_FORMAT, fingerprint, digest, eos, replace, dtype)
    return hashlib.blake2b(repr(recipe).encode(), digest_size=16).hexdigest()


class Part:
    """One corpus whose samples a token frame may carry: the served corpus, or a mixture's
    component (its sample ids start with `prefix`)."""

    def __init__(self, name: str, corpus: Any) -> None:
        self.name, self.corpus = name, corpus
        self.prefix = corpus.encoder.id_prefix
        self.indexed = isinstance(corpus, IndexedCorpus)
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        self._index: dict[str, int] | None = None

    def fingerprint(self) -> str:
        """A digest of every key and text and how they are chunked. Reads the whole corpus: only
        ever called from a build thread, once."""
        with self._lock:
            if self._fingerprint is None:
                c = self.corpus
                h = hashlib.blake2b(digest_size=16)
                h.update(repr((CHUNKING_VERSION, c.chunking, self.prefix, len(c.keys))).encode())
                for key, text in zip(c.keys, c.texts, strict=True):
                    for field in (key, text):  # length-prefixed: no two corpora hash alike
                        data = field.encode("utf-8", "surrogatepass")
                        h.update(len(data).to_bytes(8, "little"))
                        h.update(data)
                self._fingerprint = h.hexdigest()
            return self._fingerprint

    def index(self) -> dict[str, int]:
        """Document number by key."""
        with self._lock:
            if self._index is None:
                self._index = {key: i for i, key in enumerate(self.corpus.keys)}
            return self._index


class Entry:
    """One corpus's tokens under one token mode, as this server has them: on the fly until its
    entry is built or found, then ready. `ready` is read by frames in worker threads."""

    def __init__(self, part: Part, mode: TokenMode, cache: TokenCache) -> None:
        self.part, self.cache = part, cache
        self.tokenizer = mode.tokenizer
        self.digest, self.eos, self.replace = mode.digest, mode.eos_token, mode.replace
        self.dtype = mode.dtype
        self.state = "on the fly"
        self.tokens: int | None = None
        self.build_s: float | None = None
        self.path: Path | None = None
        self.ready: Ready | None = None

    def status(self) -> dict[str, Any]:
        return {
            "corpus": self.part.name,
            "tokenizer": self.digest[:12],
            "state": self.state,
            "tokens": self.tokens,
            "build_s": self.build_s,
        }

    def start(self) -> None:
        name = f"token-cache-{self.part.name}-{self.digest[:8]}"
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._prepare()
        except OSError as e:
            self.state = "on the fly"
            log.warning(
                "token cache: cannot use %s (%s); %s is tokenized on the fly. Set tokens.cache_dir "
                "to a writable folder with room, or tokens.cache=false",
                self.cache.root,
                e,
                self.part.name,
            )
        except Exception:
            self.state = "on the fly"
            log.exception("token cache: building %s failed; tokenizing on the fly", self.part.name)

    def _prepare(self) -> None:
        root = self.cache.root
        assert root is not None
        root.mkdir(parents=True, exist_ok=True)
        fingerprint = self.part.fingerprint()
        key = entry_key(fingerprint, self.digest, self.eos, self.replace, self.dtype)
        self.path = root / key
        waited = False
        while True:
            ready = self._open(locked=False)
            built = False
            if ready is None:
                with try_lock(root / f"{key}.lock") as locked:
                    if locked:  # found meanwhile, or ours to build
                        ready = self._open(locked=True)
                        if ready is None:
                            ready, built = self._build(), True
            if ready is not None:
                self._use(ready)
                if built:
                    self.cache.evict()
                return
            if not waited:
                log.info(
                    "token cache: another server is building %s for tokenizer %s; tokenizing on "
                    "the fly until it is ready",
                    self.part.name,
                    self.digest[:12],
                )
                waited = True
            time.sleep(_RECHECK_S)

    def _open(self, locked: bool) -> Ready | None:
        """The entry, if it is there and sound. A damaged one is deleted by the server that holds
        its lock (which then builds it again); until then nobody serves from it."""
        assert self.path is not None
        if not self.path.exists():
            return None
        try:
            return Ready(self.path, self.dtype, self.part.index())
        except DamagedEntry as e:
            if locked:
                log.warning(
                    "token cache: %s is damaged (%s); deleting it and building it again",
                    self.path,
                    e,
                )
                remove(self.path)
            return None

    def _use(self, ready: Ready) -> None:
        assert self.path is not None
        os.utime(self.path / "meta.json")  # its mtime says when it was last used (eviction)
        self.tokens, self.build_s = ready.meta["tokens"], ready.meta["build_s"]
        self.ready = ready
        self.state = "ready"

    def _build(self) -> Ready:
        """Tokenize the corpus into its entry (this server holds the lock) and open it."""
        assert self.path is not None
        self.state = "building"
        log.info(
            "token cache: building %s for tokenizer %s (until it is ready, tokenizing on the fly)",
            self.part.name,
            self.digest[:12],
        )
        about = {"corpus": self.part.name, "tokenizer": self.digest, "eos_token": self.eos}
        try:
            meta = build(
                self.path, self.part.corpus, self.tokenizer, self.replace, self.dtype, about
            )
        except BaseException:
            self.state = "on the fly"
            raise
        tokens, seconds = meta["tokens"], meta["build_s"]
        log.info(
            "token cache: built %s for tokenizer %s: %d tokens in %.1f s (%.0f tokens/s), %s",
            self.part.name,
            self.digest[:12],
            tokens,
            seconds,
            tokens / max(seconds, 1e-9),
            self.path,
        )
        return Ready(self.path, self.dtype, self.part.index())


class CorpusTokens:
    """What a token mode takes from the cache: a sample's ids by its id (None: tokenize it)."""

    def __init__(self, entries: dict[str, Entry], cache: TokenCache) -> None:
        self.entries, self.cache = entries, cache
        self._mixed = "" not in entries

    def lookup(self, sample_id: str) -> np.ndarray | None:
        if self._mixed:  # `plays/<key>#<chunk>`: component names hold no '/'
            name, _, rest = sample_id.partition("/")
            entry = self.entries.get(f"{name}/")
        else:
            entry, rest = self.entries[""], sample_id
        ready = entry.ready if entry is not None else None
        if ready is None:
            return None
        key, _, chunk = rest.rpartition("#")
        return ready.tokens_of(key, int(chunk))

    def count(self, from_cache: int, tokenized: int) -> None:
        with self.cache.lock:
            self.cache.from_cache += from_cache
            self.cache.tokenized += tokenized


class TokenCache:
    """The cache folder (None: nothing on disk, every sample tokenized on the fly), the entries this
    server uses, and how many samples came from them."""

    def __init__(self, root: str | Path | None, max_bytes: int = 20 << 30) -> None:
        self.root = Path(root) if root is not None else None
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.from_cache = 0  # samples in token frames taken from an entry
        self.tokenized = 0  # ... and tokenized on the fly
        self._parts: dict[int, list[Part]] = {}
        self._entries: dict[tuple, Entry] = {}

    @property
    def tokenizers_dir(self) -> Path | None:
        return self.root / "tokenizers" if self.root is not None else None

    def use(self, corpus: Any, mode: TokenMode) -> TokenMode:
        """`mode` reading from this cache; the first use of a tokenizer starts building (or
        opening) its entries in the background. Cheap: called on the event loop."""
        entries = {}
        for part in self._parts_of(corpus):
            key = (part.prefix, mode.digest, mode.eos_token, mode.replace, mode.dtype)
            with self.lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = Entry(part, mode, self)
                    if self.root is not None and part.indexed:
                        entry.start()
            entries[part.prefix] = entry
        return replace(mode, cached=CorpusTokens(entries, self))

    def _parts_of(self, corpus: Any) -> list[Part]:
        parts = self._parts.get(id(corpus))
        if parts is None:
            mixed = isinstance(corpus, MixCorpus)
            pairs = (
                zip(corpus.names, corpus.parts, strict=True) if mixed else [(corpus.name, corpus)]
            )
            parts = self._parts[id(corpus)] = [Part(name, c) for name, c in pairs]
        return parts

    def status(self) -> dict[str, Any]:
        with self.lock:
            entries = [entry.status() for entry in self._entries.values()]
        return {
            "dir": str(self.root) if self.root is not None else None,
            "entries": entries,
            "samples_from_cache": self.from_cache,
            "samples_tokenized": self.tokenized,
        }

    def evict(self) -> None:
        """Delete the least recently used entries this server does not use until the cache fits
        in max_bytes (another server using one keeps its mapping; it rebuilds it if it restarts)."""
        assert self.root is not None
        with self.lock:
            mine = {entry.path for entry in self._entries.values()}
        found = []
        for meta in self.root.glob("*/meta.json"):
            try:
                size = sum(f.stat().st_size for f in meta.parent.iterdir())
                found.append((meta.stat().st_mtime, meta.parent, size))
            except FileNotFoundError:
                continue  # deleted meanwhile by another server
        total = sum(size for _, _, size in found)
        for _, folder, size in sorted(found):
            if total <= self.max_bytes:
                break
            if folder not in mine:
                remove(folder)
                total -= size
                log.info(
                    "token cache: deleted %s (%.1f MB, least recently used); %.1f MB remain "
                    "(tokens.cache_max_bytes %.1f MB)",
                    folder,
                    size / 1e6,
                    total / 1e6,
                    self.max_bytes / 1e6,
                )
