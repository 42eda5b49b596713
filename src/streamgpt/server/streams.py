"""Per-consumer streams of chunks, and the cursors that resume them exactly.

Consumer k of K (k = rank * num_workers + worker) receives a stream that is a pure function of
(corpus, seed, epoch, k, K, cursor). A cursor is the position after the last chunk handed out;
a stream rebuilt from it continues with the next chunk, nothing repeated, nothing skipped.
The core protocol's shared stream is the same thing with k=0, K=1 and the server's seed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamgpt.server.corpus import (
    Chunk,
    IndexedCorpus,
    ShardedCorpus,
    chunk_document,
    key_hash,
    shuffle_order,
)

CURSOR_VERSION = 1
SPLITS = ("train", "validation")


# A handshake's consumer.stage on a source without stages from a step.
NO_STEP_STAGES = (
    "consumer.stage asks for a mixture's stage that starts from a step, but this server's "
    "source has no such stages (source.stages[].from_step)"
)


class CursorError(ValueError):
    """A cursor that this server did not issue, or that belongs to another consumer or corpus."""


class NothingLeft(ValueError):
    """Every sample of an entire epoch is excluded (held out with setValidationIds)."""


@dataclass(frozen=True)
class ConsumerSpec:
    seed: int
    index: int  # k
    count: int  # K
    split: str = "train"

    def describe(self) -> str:
        if self.split == "validation":
            return "validation"
        return f"{self.index}/{self.count} seed={self.seed}"


def quota(max_samples: int | None, spec: ConsumerSpec) -> int | None:
    """Consumer k's share of a configured end of `max_samples` training samples over K consumers."""
    if max_samples is None or spec.split == "validation":
        return None
    base, extra = divmod(max_samples, spec.count)
    return base + (1 if spec.index < extra else 0)


class StreamBase(ABC):
    """What the server asks of a stream: the next chunks, encoded samples, the cursor after them.
    `Stream` walks one corpus; a mixture (mixture.py) walks several."""

    spec: ConsumerSpec
    epoch: int
    blocking_io: bool

    @abstractmethod
    def take(self, n: int) -> list[Chunk]:
        """The next n chunks; fewer only when the stream reaches its end."""

    @abstractmethod
    def cursor(self) -> dict[str, Any]:
        """The position after the last chunk taken, which rebuilds the stream from there."""

    def _open_end(
        self, corpus: Any, spec: ConsumerSpec, max_epochs: int | None, max_samples: int | None
    ) -> None:
        """The corpus, the consumer and the configured end (training streams only end by epochs;
        max_samples is split among the consumers)."""
        self.corpus = corpus
        self.spec = spec
        self.max_epochs = max_epochs if spec.split == "train" else None
        self.quota = quota(max_samples, spec)

    def payloads(self, n: int, exclude: frozenset[str]) -> tuple[list[bytes], dict[str, Any]]:
        """Up to n encoded samples and the cursor after them, skipping the ids in `exclude`
        (setValidationIds); fewer only at the stream's end."""
        out: list[bytes] = []
        first_epoch = self.epoch
        while len(out) < n:
            chunks = self.take(n - len(out))
            if not chunks:
                break
            if not exclude:
                out += [c.payload for c in chunks]
                continue
            kept = [c.payload for c in chunks if c.sample_id not in exclude]
            if not kept and not out and self.epoch > first_epoch + 1:
                raise NothingLeft(
                    f"every sample of an entire epoch is among the {len(exclude)} validation ids "
                    "this server was given (setValidationIds); nothing is left to train on"
                )
            out += kept
        return out, self.cursor()

    def next_chunk(self) -> Chunk | None:
        """The next chunk, or None once the stream has reached its end."""
        chunks = self.take(1)
        return chunks[0] if chunks else None


class Stream(StreamBase):
    """A consumer's walk through a corpus: its position, the configured end, epochs rolling over,
    and the cursor that rebuilds it. Subclasses say what a position is (`POSITION`, the cursor
    fields besides epoch and n) and how to move it (`_epoch_done`, `_start_epoch`, `_advance`)."""

    POSITION: tuple[str, ...] = ()
    blocking_io: bool

    def __init__(
        self,
        corpus: Any,
        spec: ConsumerSpec,
        *,
        epoch: int = 0,
        cursor: Any = None,
        max_epochs: int | None = None,
        max_samples: int | None = None,
    ) -> None:
        self._open_end(corpus, spec, max_epochs, max_samples)
        self.epoch, self.n = epoch, 0
        for name in self.POSITION:
            setattr(self, name, 0)
        if cursor is not None:
            fields = ("epoch", *self.POSITION, "n")
            c = check_cursor(cursor, corpus.fingerprint, spec, fields)
            for name in fields:
                setattr(self, name, c[name])
        self._open()

    @abstractmethod
    def _open(self) -> None:
        """Build what the position needs (and refuse a position past its epoch's end)."""

    @abstractmethod
    def _epoch_done(self) -> bool:
        """Whether the position is past the last document of its epoch."""

    @abstractmethod
    def _start_epoch(self) -> None:
        """The position at the start of `self.epoch`."""

    @abstractmethod
    def _advance(self, room: int) -> list[Chunk]:
        """Up to `room` chunks from the position on, or none after moving to the next document."""

    def take(self, n: int) -> list[Chunk]:
        """The next n chunks; fewer only when the stream reaches its end."""
        out: list[Chunk] = []
        rollovers = 0
        while (room := self._room(n - len(out))) > 0:
            if self._epoch_done():
                if self.spec.split == "validation":
                    break  # the validation split is read once
                rollovers += 1
                if rollovers > 1 and not out:
                    raise RuntimeError(
                        f"consumer {self.spec.describe()} has no documents in an entire epoch"
                    )
                self.epoch += 1
                self._start_epoch()
                continue
            piece = self._advance(room)
            out += piece
            self.n += len(piece)
        return out

    def _room(self, wanted: int) -> int:
        """How many of `wanted` more chunks the configured end still allows."""
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            return 0
        return wanted if self.quota is None else max(0, min(wanted, self.quota - self.n))

    def cursor(self) -> dict[str, Any]:
        return {
            "v": CURSOR_VERSION,
            "fp": self.corpus.fingerprint,
            "split": self.spec.split,
            "seed": self.spec.seed,
            "k": self.spec.index,
            "K": self.spec.count,
            "epoch": self.epoch,
            **{name: getattr(self, name) for name in self.POSITION},
            "n": self.n,
        }

    def position(self) -> dict[str, Any]:
        """The cursor's fields that move (a mixture keeps these for each component)."""
        return {
            "epoch": self.epoch,
            **{name: getattr(self, name) for name in self.POSITION},
            "n": self.n,
        }


def check_cursor(
    cursor: Any, fingerprint: str, spec: ConsumerSpec, fields: tuple[str, ...]
) -> dict:
    if not isinstance(cursor, dict):
        raise CursorError(
            f"cursor must be a JSON object this server sent, got {type(cursor).__name__}"
        )
    if cursor.get("v") != CURSOR_VERSION:
        raise CursorError(f"cursor version {cursor.get('v')!r} is not {CURSOR_VERSION}")
    if cursor.get("fp") != fingerprint:
        raise CursorError(
            "cursor was issued for another corpus or chunking (fingerprint "
            f"{cursor.get('fp')!r}, this server serves {fingerprint!r}); start without a cursor"
        )
    if cursor.get("split") != spec.split:
        raise CursorError(
            f"cursor is for split {cursor.get('split')!r}, handshake asks {spec.split!r}"
        )
    if spec.split == "train":
        mine = (spec.seed, spec.index, spec.count)
        theirs = (cursor.get("seed"), cursor.get("k"), cursor.get("K"))
        if theirs != mine:
            raise CursorError(
                f"cursor belongs to consumer {theirs[1]}/{theirs[2]} seed={theirs[0]}, "
                f"the handshake says {spec.index}/{spec.count} seed={spec.seed}"
            )
    for name in fields:
        value = cursor.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CursorError(
                f"cursor field {name!r} must be a non-negative integer, got {value!r}"
            )
    return cursor


class IndexedStream(Stream):
    """A consumer's walk through an IndexedCorpus: documents of its share, chunk by chunk."""

    POSITION = ("doc", "chunk")
    blocking_io = False
    corpus: IndexedCorpus

    def _open(self) -> None:
        self._docs_epoch, self._docs_cache = -1, np.empty(0, dtype=np.int64)
        if self.doc > len(self._docs()):
            raise CursorError(f"cursor document {self.doc} is past the end of its epoch")

    def _docs(self) -> np.ndarray:
        if self._docs_epoch != self.epoch:  # one permutation per epoch, not per chunk
            if self.spec.split == "validation":
                self._docs_cache = self.corpus.validation_ids
            else:
                s = self.spec
                self._docs_cache = self.corpus.consumer_docs(s.seed, self.epoch, s.index, s.count)
            self._docs_epoch = self.epoch
        return self._docs_cache

    def _epoch_done(self) -> bool:
        return self.doc >= len(self._docs())

    def _start_epoch(self) -> None:
        self.doc, self.chunk = 0, 0

    def _advance(self, room: int) -> list[Chunk]:
        chunks = self.corpus.chunks(int(self._docs()[self.doc]))
        if self.chunk >= len(chunks):
            self.doc, self.chunk = self.doc + 1, 0
            return []
        piece = chunks[self.chunk : self.chunk + room]
        self.chunk += len(piece)
        return piece


@dataclass
class _Doc:
    row: int
    key: str
    hash: int
    text: str


class ShardedStream(Stream):
    """A consumer's walk through a ShardedCorpus.

    Position: epoch, the consumer's unit, the raw row where the current shuffle window starts,
    the document within the window and the chunk within the document. Resuming re-reads the unit
    from the window's first row and rebuilds the same window.
    """

    POSITION = ("unit", "row", "pos", "chunk")
    blocking_io = True
    corpus: ShardedCorpus

    def _open(self) -> None:
        self._units = self._epoch_units()
        if self.unit > len(self._units):
            raise CursorError(f"cursor unit {self.unit} is past the end of its epoch")
        self._window: list[_Doc] | None = None
        self._window_end = 0  # raw row after the last row the window examined
        self._rows: Iterator[tuple[int, str, str]] | None = None
        self._rows_at = -1  # raw row the open reader yields next
        self._chunks: list[Chunk] | None = None

    def _epoch_units(self) -> list[tuple[int, int, int]]:
        if self.spec.split == "validation":
            return [(u, 0, 1) for u in range(len(self.corpus.units))]
        s = self.spec
        return self.corpus.consumer_units(s.seed, self.epoch, s.index, s.count)

    def _load_window(self) -> list[_Doc]:
        unit, share, shares = self._units[self.unit]
        if self._rows is None or self._rows_at != self.row:
            self._rows = self.corpus.read_unit(unit, self.row)
            self._rows_at = self.row
        want_validation = self.spec.split == "validation"
        docs: list[_Doc] = []
        end = self.row
        for row, key, text in self._rows:
            end = row + 1
            if row % shares != share:
                continue
            h = key_hash(key)
            if self.corpus.is_validation(h) != want_validation or not self.corpus.keeps(text):
                continue
            docs.append(_Doc(row, key, h, text))
            if len(docs) == self.corpus.window:
                break
        else:
            self._rows = None
        self._rows_at = end
        self._window_end = end
        if not want_validation and len(docs) > 1:
            hashes = np.array([d.hash for d in docs], dtype=np.uint64)
            docs = [docs[i] for i in shuffle_order(hashes, self.spec.seed, self.epoch)]
        return docs

    def _epoch_done(self) -> bool:
        return self.unit >= len(self._units)

    def _start_epoch(self) -> None:
        self._units = self._epoch_units()
        self.unit, self.row, self.pos, self.chunk = 0, 0, 0, 0
        self._window, self._rows, self._chunks = None, None, None

    def _advance(self, room: int) -> list[Chunk]:
        if self._window is None:
            self._window = self._load_window()
            if not self._window:
                self.unit, self.row, self.pos, self.chunk = self.unit + 1, 0, 0, 0
                self._window, self._rows = None, None
                return []
        if self.pos >= len(self._window):
            self.row, self.pos, self.chunk = self._window_end, 0, 0
            self._window, self._chunks = None, None
            return []
        if self._chunks is None:
            doc = self._window[self.pos]
            self._chunks = chunk_document(
                doc.key, doc.text, self.corpus.chunking, self.corpus.encoder
            )
        if self.chunk >= len(self._chunks):
            self.pos, self.chunk, self._chunks = self.pos + 1, 0, None
            return []
        piece = self._chunks[self.chunk : self.chunk + room]
        self.chunk += len(piece)
        return piece


def open_stream(corpus: Any, spec: ConsumerSpec, **options: Any) -> StreamBase:
    """Consumer `spec`'s stream of `corpus`; `options` as Stream's (epoch, cursor, the end), and
    a mixture's `stage` (mixture.MixStream)."""
    if not hasattr(corpus, "open_stream") and options.pop("stage", None) is not None:
        raise CursorError(NO_STEP_STAGES)
    if isinstance(corpus, IndexedCorpus):
        return IndexedStream(corpus, spec, **options)
    if isinstance(corpus, ShardedCorpus):
        return ShardedStream(corpus, spec, **options)
    return corpus.open_stream(spec, **options)  # a mixture (mixture.MixCorpus) opens its own
