"""Documents, chunks, and the deterministic orders that every stream is built from.

A stream is a pure function of the corpus and a few integers (seed, epoch, consumer k of K, cursor),
so nothing here may depend on timing, on the order of requests, or on a random generator whose
output could change between library versions. Orders come from 64-bit hashes of document keys:
reproducible forever, and adding a document to a corpus does not reshuffle the others.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import orjson

_UINT64 = np.uint64
# Bumped whenever Chunking.split changes what a chunk holds: cursors of an older server are refused.
CHUNKING_VERSION = 2


def key_hash(key: str) -> int:
    """A stable 64-bit hash of a string (blake2b, so identical on every machine and Python)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter((key_hash(k) for k in keys), dtype=_UINT64, count=len(keys))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that scrambles every input bit."""
    with np.errstate(over="ignore"):
        x = x + _UINT64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _UINT64(30))) * _UINT64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _UINT64(27))) * _UINT64(0x94D049BB133111EB)
        return x ^ (x >> _UINT64(31))


def shuffle_order(hashes: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The permutation of `hashes`' positions for (seed, epoch): sort by a salted re-hash."""
    salt = _UINT64(key_hash(f"order:{seed}:{epoch}"))
    return np.argsort(mix64(hashes ^ salt), kind="stable")


@dataclass(frozen=True)
class Chunking:
    """How documents are cut into samples.

    Chunks hold `words` whitespace-separated words. With whitespace="preserve" a chunk keeps the
    document's own spacing and newlines, and owns the whitespace that precedes its first word, so
    the chunks of a document concatenate back to the (stripped) document exactly. Splitting right
    after a word also matters to the trainer: no GPT-2-style pre-token spans a word's end and the
    whitespace after it, so tokenizing chunk by chunk gives exactly the tokens of the whole
    document. "collapse" joins words with single spaces as EIR's reference server does. The last
    chunk of every document ends with `eot_marker`, so a client that concatenates consecutive
    samples sees where one document ends and the next begins.
    """

    words: int = 512
    eot_marker: str = "<|endoftext|>"
    whitespace: str = "preserve"

    @property
    def _pattern(self) -> re.Pattern[str]:
        return _chunk_pattern(self.words)

    def split(self, text: str) -> list[str]:
        if self.whitespace == "collapse":
            words = text.split()
            chunks = [" ".join(words[i : i + self.words]) for i in range(0, len(words), self.words)]
        else:
            chunks = self._pattern.findall(text.strip())
        if not chunks:
            return []
        chunks[-1] = chunks[-1] + self.eot_marker
        return chunks


@lru_cache(maxsize=8)
def _chunk_pattern(words: int) -> re.Pattern[str]:
    # Up to `words` words, with the whitespace before each of them.
    return re.compile(rf"\s*\S+(?:\s+\S+){{0,{words - 1}}}")


def count_words(text: str, at_least: int) -> bool:
    """True when `text` has at least `at_least` words; stops counting once it knows."""
    if at_least <= 1:
        return bool(text.strip())
    return any(n >= at_least for n, _ in enumerate(re.finditer(r"\S+", text), start=1))


@dataclass(frozen=True)
class Chunk:
    sample_id: str
    payload: bytes  # the sample, already JSON-encoded


class SampleEncoder:
    """Encodes one sample as EIR expects it, with the text under inputs and target_labels.

    The text is JSON-escaped once and spliced into a byte template twice: the sample is the
    hot path of the server, and this is about twice as fast as encoding a dict.
    """

    def __init__(self, output_name: str = "text_output", id_prefix: str = "") -> None:
        self.output_name = output_name
        # Put before every sample id: a mixture's component name (`plays/`), else nothing.
        self.id_prefix = id_prefix
        name = orjson.dumps(output_name)
        self._head = b'{"inputs":{' + name + b":"
        self._mid = b'},"target_labels":{' + name + b":{" + name + b":"
        self._tail = b'}},"sample_id":'

    def encode(self, sample_id: str, text: str) -> bytes:
        t = orjson.dumps(text)
        return self._head + t + self._mid + t + self._tail + orjson.dumps(sample_id) + b"}"


def sample_id_of(payload: bytes) -> str:
    """The id of a sample SampleEncoder encoded, without parsing its text: the id comes last, and
    `"sample_id":` cannot occur in the JSON-escaped text before it (its quotes are escaped)."""
    return orjson.loads(payload[payload.rindex(b'"sample_id":') + 12 : -1])


class ChunkCache:
    """Least-recently-used encoded chunks of documents, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[object, tuple[list[Chunk], int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: object, build: Callable[[], list[Chunk]]) -> list[Chunk]:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[0]
        chunks = build()
        size = sum(len(c.payload) for c in chunks)
        self._entries[key] = (chunks, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old
        return chunks


def chunk_document(key: str, text: str, chunking: Chunking, encoder: SampleEncoder) -> list[Chunk]:
    """A document's samples. Sample ids derive from (document key, chunk index) only, behind the
    encoder's id prefix."""
    pieces = chunking.split(text)
    ids = [f"{encoder.id_prefix}{key}#{i}" for i in range(len(pieces))]
    return [Chunk(i, encoder.encode(i, piece)) for i, piece in zip(ids, pieces, strict=True)]


def fingerprint_of(*parts: object) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


class IndexedCorpus:
    """A corpus whose documents are all known at start-up and readable by index.

    Training order is an exact permutation of all training documents per (seed, epoch); consumer
    k of K takes every K-th document of it. Validation documents are the `validation_docs`
    documents with the smallest key hashes, served in hash order.
    """

    blocking_io = False

    def __init__(
        self,
        name: str,
        keys: Sequence[str],
        texts: Sequence[str],
        *,
        chunking: Chunking,
        encoder: SampleEncoder,
        validation_docs: int,
        description: dict,
        cache_bytes: int = 256 << 20,
    ) -> None:
        if len(keys) != len(texts):
            raise ValueError(f"{name}: {len(keys)} document keys but {len(texts)} texts")
        if len(set(keys)) != len(keys):
            dup = next(k for k, n in Counter(keys).items() if n > 1)
            raise ValueError(f"{name}: document key {dup!r} appears twice; keys must be unique")
        if not 0 <= validation_docs < len(keys):
            raise ValueError(
                f"{name}: {validation_docs} validation documents requested out of {len(keys)}; "
                f"at least one document must remain for training (lower source.validation_docs)"
            )
        self.name = name
        self.keys = keys
        self.texts = texts
        self.chunking = chunking
        self.encoder = encoder
        self.hashes = key_hashes(keys)
        by_hash = np.argsort(self.hashes, kind="stable")
        self.validation_ids = by_hash[:validation_docs]
        self.train_ids = np.sort(by_hash[validation_docs:])
        self._train_hashes = self.hashes[self.train_ids]
        self._cache = ChunkCache(cache_bytes)
        self.fingerprint = fingerprint_of(
            name, CHUNKING_VERSION, chunking, self.hashes.tobytes(), self.validation_ids.tobytes()
        )
        self.description = {
            **description,
            "documents": len(keys),
            "train_documents": int(self.train_ids.size),
            "validation_documents": int(self.validation_ids.size),
        }

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return _cached_order(self, seed, epoch)

    def consumer_docs(self, seed: int, epoch: int, k: int, count: int) -> np.ndarray:
        return self.epoch_order(seed, epoch)[k::count]

    def chunks(self, doc: int) -> list[Chunk]:
        return self._cache.get(
            doc,
            lambda: chunk_document(self.keys[doc], self.texts[doc], self.chunking, self.encoder),
        )


@lru_cache(maxsize=16)
def _cached_order(corpus: IndexedCorpus, seed: int, epoch: int) -> np.ndarray:
    order = corpus.train_ids[shuffle_order(corpus._train_hashes, seed, epoch)]
    order.setflags(write=False)
    return order


# A sharded document reader: (unit index, first row) -> (row, key, text) for rows >= first row.
UnitReader = Callable[[int, int], Iterator[tuple[int, str, str]]]


class ShardedCorpus:
    """A corpus too large to index, read as a list of units (files or row groups) in order.

    Units are permuted per (seed, epoch) and dealt to consumers; within a unit, each consumer's
    documents are shuffled in windows of `window` documents. A document belongs to validation
    when its key hash falls below `validation_fraction` of the hash range, so membership is
    decided without a global view.
    """

    blocking_io = True

    def __init__(
        self,
        name: str,
        units: Sequence[str],
        read_unit: UnitReader,
        *,
        chunking: Chunking,
        encoder: SampleEncoder,
        validation_fraction: float,
        min_words: int,
        window: int,
        description: dict,
    ) -> None:
        if not units:
            raise ValueError(f"{name}: the dataset has no data files")
        self.name = name
        self.units = list(units)
        self.read_unit = read_unit
        self.chunking = chunking
        self.encoder = encoder
        self.min_words = min_words
        self.window = window
        self.validation_threshold = int(validation_fraction * 2.0**64)
        self.unit_hashes = key_hashes(self.units)
        self.fingerprint = fingerprint_of(
            name,
            CHUNKING_VERSION,
            chunking,
            self.unit_hashes.tobytes(),
            self.validation_threshold,
            min_words,
            window,
        )
        self.description = {**description, "units": len(self.units)}

    def is_validation(self, doc_hash: int) -> bool:
        return doc_hash < self.validation_threshold

    def keeps(self, text: str) -> bool:
        return count_words(text, self.min_words)

    def consumer_units(
        self, seed: int, epoch: int, k: int, count: int
    ) -> list[tuple[int, int, int]]:
        """Consumer k's units for an epoch, as (unit, share, shares).

        With at least as many units as consumers, each consumer gets whole units. With more
        consumers than units, consumers that land on the same unit split its rows: a row r goes
        to the consumer whose share is r % shares. Disjoint and covering either way.
        """
        order = self.units_in_order(seed, epoch)
        n = len(order)
        if count <= n:
            return [(int(u), 0, 1) for u in order[k::count]]
        slot = k % n
        sharing = len(range(slot, count, n))
        return [(int(order[slot]), k // n, sharing)]

    def units_in_order(self, seed: int, epoch: int) -> np.ndarray:
        return shuffle_order(self.unit_hashes, seed, epoch)
