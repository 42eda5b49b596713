"""One entry of the token cache (server/token_cache.py) on disk: written, checked, opened, deleted.

    <cache_dir>/<key>/tokens.bin        the ids of every chunk in corpus order, little-endian
                     offsets.npy       int64: where each chunk's ids start, then the total
                     first_chunk.npy   int64: each document's first chunk, then the chunk count
                     meta.json         format, counts, build time (its mtime: when last opened)
    <cache_dir>/<key>.lock            locked while the entry is built

An entry is written into a temporary folder and renamed into place, so a reader finds all of it
or nothing; one whose files disagree (a truncated copy, a full disk) is refused, never served.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from tokenizers import Tokenizer

from streamgpt.server.corpus import IndexedCorpus
from streamgpt.wire import TOKEN_DTYPES

CACHE_FORMAT = 1  # bumped whenever an entry's files change meaning: old entries are not found
_BATCH_CHARS = 2 << 20  # text per encode_batch: work for every core, a bounded amount of memory


class DamagedEntry(Exception):
    """An entry whose files do not agree with each other or with the corpus."""


class Ready:
    """An opened entry: each chunk's token ids, memory-mapped; `index` numbers the documents by
    key. Raises DamagedEntry."""

    def __init__(self, path: Path, dtype: str, index: dict[str, int]) -> None:
        little = np.dtype(TOKEN_DTYPES[dtype])
        try:
            self.meta = orjson.loads((path / "meta.json").read_bytes())
            self.offsets = np.load(path / "offsets.npy")
            self.first = np.load(path / "first_chunk.npy")
            size = (path / "tokens.bin").stat().st_size
        except (OSError, ValueError) as e:  # a JSON or .npy error is a ValueError
            raise DamagedEntry(f"unreadable: {e}") from None
        problem = _disagreement(self.meta, self.offsets, self.first, size, little, len(index))
        if problem:
            raise DamagedEntry(problem)
        n = self.meta["tokens"]
        # np.memmap cannot map an empty file, and an entry of no tokens has nothing to map. A plain
        # view of the mapping: slicing a memmap costs more than the rest of a lookup.
        mapped = np.memmap(path / "tokens.bin", little, "r", shape=(n,)) if n else None
        self.tokens = mapped.view(np.ndarray) if mapped is not None else np.zeros(0, little)
        self.index = index

    def tokens_of(self, key: str, chunk: int) -> np.ndarray | None:
        doc = self.index.get(key)
        if doc is None or not 0 <= chunk < self.first[doc + 1] - self.first[doc]:
            return None
        c = self.first[doc] + chunk
        return self.tokens[self.offsets[c] : self.offsets[c + 1]]


def _disagreement(
    meta: Any, offsets: np.ndarray, first: np.ndarray, size: int, little: np.dtype, docs: int
) -> str | None:
    """What is wrong with an entry's files, or None when they agree."""
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return f"meta.json is not format {CACHE_FORMAT}"
    documents, chunks, tokens = (meta.get(k) for k in ("documents", "chunks", "tokens"))
    if not all(isinstance(n, int) for n in (documents, chunks, tokens)):
        return "meta.json does not count the documents, chunks and tokens"
    if documents != docs:
        return f"meta.json says {documents} documents, the corpus has {docs}"
    if offsets.dtype != np.int64 or offsets.shape != (chunks + 1,) or offsets[0] != 0:
        return f"offsets.npy does not hold {chunks} + 1 offsets from 0"
    if first.dtype != np.int64 or first.shape != (documents + 1,) or first[0] != 0:
        return f"first_chunk.npy does not hold {documents} + 1 chunk numbers from 0"
    if offsets[-1] != tokens or first[-1] != chunks:
        return f"the offsets end at {offsets[-1]} tokens and chunk {first[-1]}"
    if np.any(np.diff(offsets) < 0) or np.any(np.diff(first) < 0):
        return "the offsets go backwards"
    if size != tokens * little.itemsize:
        return f"tokens.bin is {size} bytes, not the {tokens * little.itemsize} of {tokens} tokens"
    return None


def build(
    path: Path,
    corpus: IndexedCorpus,
    tokenizer: Tokenizer,
    replace: str | None,
    dtype: str,
    about: dict[str, Any],
) -> dict[str, Any]:
    """Write the entry at `path` (its lock held) in a temporary folder renamed into place; `about`
    goes into its meta.json (with the eos token). Returns the meta."""
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a build or deletion killed midway
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.mkdir()
    started = time.monotonic()
    try:
        chunks, tokens = write_tokens(tmp, corpus, tokenizer, replace, about["eos_token"], dtype)
        meta = {
            "format": CACHE_FORMAT,
            **about,
            "dtype": dtype,
            "documents": len(corpus.keys),
            "chunks": chunks,
            "tokens": tokens,
            "build_s": round(time.monotonic() - started, 3),
        }
        (tmp / "meta.json").write_bytes(orjson.dumps(meta))
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def write_tokens(
    folder: Path,
    corpus: IndexedCorpus,
    tokenizer: Tokenizer,
    replace: str | None,
    eos: str,
    dtype: str,
) -> tuple[int, int]:
    """Every chunk of every document into `folder`, tokenized as TokenMode.frame tokenizes a
    sample, a batch of chunks at a time (only the offsets are held). Returns (chunks, tokens)."""
    little = np.dtype(TOKEN_DTYPES[dtype])
    ends = array("q", [0])  # the offsets: 0, then each chunk's end
    first = array("q", [0])
    batch: list[str] = []
    size = 0
    with open(folder / "tokens.bin", "wb") as out:
        for text in corpus.texts:
            pieces = corpus.chunking.split(text)
            if replace:
                pieces = [p.replace(replace, eos) for p in pieces]
            batch += pieces
            size += len(text)
            first.append(first[-1] + len(pieces))
            if size >= _BATCH_CHARS:
                _encode_into(out, batch, tokenizer, little, ends)
                batch, size = [], 0
        _encode_into(out, batch, tokenizer, little, ends)
    np.save(folder / "offsets.npy", np.frombuffer(ends, np.int64))
    np.save(folder / "first_chunk.npy", np.frombuffer(first, np.int64))
    return len(ends) - 1, ends[-1]


def _encode_into(out: Any, texts: list[str], tokenizer: Tokenizer, little: Any, ends: array):
    if not texts:
        return
    # The Rust batch encoder runs on every core and releases the GIL meanwhile.
    arrays = [
        np.asarray(e.ids, little) for e in tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    for a in arrays:
        ends.append(ends[-1] + len(a))
    out.write(np.concatenate(arrays).tobytes())


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on `path` if no other process holds it (True), else False at once."""
    with open(path, "a") as f:  # closing the file releases the lock, even if the process dies
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True


def remove(folder: Path) -> None:
    """Delete an entry: renamed away first, so no server ever opens half of one."""
    trash = folder.with_name(f".{folder.name}.{os.getpid()}.{threading.get_ident()}.deleted")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return  # another server deleted it
    shutil.rmtree(trash, ignore_errors=True)
