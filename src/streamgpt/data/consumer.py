"""One consumer of the stream: a background thread that reads, tokenizes and packs batches.

The thread keeps `requests_in_flight` requests at the server, tokenizes each reply in one batch
call, packs the tokens (packing.py) and queues finished batches, at most `prefetch_batches` ahead
of the training step. Every batch carries the consumer's state right after it (server cursor,
tokens and sample ids not yet trained), so a checkpoint records exactly what has been trained and
a resume continues with the very next batch. If the server goes away, the thread reconnects from
the last cursor with exponential backoff; nothing is repeated or skipped.

The background thread never calls into torch: it hands over numpy arrays, made tensors by the
thread that iterates. A daemon thread inside a torch op when the interpreter exits aborts the
process ("terminate called without an active exception", exit code 134: torch's operators release
the GIL and cannot take it back during finalization). Threads are also stopped and joined when
training ends (StreamDataModule.teardown) and at exit.

A mixture whose stages start from a training step (the server's `from_step`, docs/PROTOCOL.md
§3.9): when the next batch is trained in a later stage than the data in hand, the feed drops the
tokens it holds, reconnects from the cursor after the reply that completed its last batch (a
deterministic point: every request asks for the same number of samples) asking for that stage,
and packs afresh. Its batch count and stage go into the state, so a resume does the same.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from streamgpt.data.client import Connection, ServerRefused, StreamError
from streamgpt.data.packing import TokenPacker
from streamgpt.data.tokens_on_wire import WireTokens

log = logging.getLogger("streamgpt.data")

_END = object()  # the stream reached the server's configured end


@dataclass(frozen=True)
class StepStages:
    """A mixture's stages that start from a training step, as a consumer's batches meet them."""

    starts: tuple[int, ...]  # the global step where each stage starts; the first is 0
    step_of: Callable[[int], int]  # the feed's batch number (0, 1, ...) -> its optimizer step

    def stage_of(self, batch: int) -> int:
        return bisect.bisect_right(self.starts, self.step_of(batch)) - 1

    @classmethod
    def of_worker(
        cls, starts: tuple[int, ...], accumulate: int, worker: int, num_workers: int
    ) -> StepStages:
        """Worker w of W (the consumer's `worker`, after a resume's phase) makes its rank's
        micro-batches w, w+W, w+2W, ...; micro-batch i is trained at step i // accumulate."""
        return cls(starts, functools.partial(_step_of, worker, num_workers, accumulate))


def _step_of(worker: int, num_workers: int, accumulate: int, batch: int) -> int:
    return (worker + batch * num_workers) // accumulate


class ConsumerFeed:
    """One consumer's batches, produced by a background thread into a bounded queue."""

    def __init__(
        self,
        url: str,
        consumer: dict[str, Any],
        cfg: Any,
        encode: Callable[[list[str]], list[list[int]]],
        token: str | None,
        state: dict[str, Any] | None = None,
        rows: int | None = None,
        stages: StepStages | None = None,
        wire: WireTokens | None = None,
    ) -> None:
        """`rows`: sequences per batch, if not cfg.batch_size (a canonical stream's share of a
        step, data/elastic.py). `wire`: read token ids, not text (data.stream.tokens_on_wire)."""
        self.url = url
        self.consumer = consumer
        self.k = consumer["rank"] * consumer["num_workers"] + consumer["worker"]
        self.cfg = cfg
        self.encode = encode
        self.token = token
        self.cursor = state["cursor"] if state else None
        self.rows = rows or cfg.batch_size
        self.packer = TokenPacker(self.rows, cfg.max_length, state)
        self.stages = stages
        self.wire = wire
        self.batches = state.get("batches", 0) if state else 0  # produced, across resumes
        self.stage = state.get("stage", 0) if state else 0  # of the data in hand
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"stream-consumer-{self.k}", daemon=True
        )
        self.reconnects = 0
        self._conn: Connection | None = None  # the open connection, for close() to interrupt

    def start(self) -> None:
        """Start reading ahead (iterating starts it too)."""
        if self._thread.ident is None:
            _FEEDS.add(self)
            self._thread.start()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.start()
        try:
            while True:
                item = self.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield _as_tensors(item)
        finally:
            self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer and wait for it (its connection is closed under it if it waits for
        a reply; blocked on a full queue, it notices within 0.2 s)."""
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _connect(self, failing_since: float | None = None) -> Connection:
        """A handshaken connection resuming at self.cursor.

        Failures (no server, a stalled or garbled one) are retried with exponential backoff for
        `retry.budget_s`, counted from the first failure since the last good reply.
        """
        retry = self.cfg.retry
        wait, last = retry.backoff_s, "connection lost"
        if failing_since is not None:  # a connection that just failed: back off before retrying
            self._backoff(failing_since, wait, last)
            wait = min(wait * 2, retry.max_backoff_s)
        failing_since = failing_since or time.monotonic()
        while not self._stop.is_set():
            conn = Connection(
                self.url,
                token=self.token,
                connect_timeout=self.cfg.connect_timeout_s,
                recv_timeout=self.cfg.recv_timeout_s,
            )
            hello = {**self.consumer, "cursor": self.cursor}
            if self.stages is not None:
                hello["stage"] = self.stage
            try:
                self._conn = conn.open(hello) if self.wire is None else self.wire.open(conn, hello)
                return self._conn
            except ServerRefused:
                raise
            except (OSError, TimeoutError, ConnectionError) as e:
                conn.close()
                last = str(e)
            self._backoff(failing_since, wait, last)
            wait = min(wait * 2, retry.max_backoff_s)
        raise StreamError("stopped")

    def _backoff(self, failing_since: float, wait: float, last: str) -> None:
        budget = self.cfg.retry.budget_s
        if time.monotonic() - failing_since + wait > budget:
            raise StreamError(
                f"lost the stream server at {self.url} and could not get data from it for "
                f"{budget:g} s (data.stream.retry.budget_s): {last}. Start a server with "
                "`make serve`, or point data.stream.url at a running one; the run can then "
                "resume from its last checkpoint with resume=auto"
            )
        log.warning("consumer %d: %s: %s; retrying in %.1f s", self.k, self.url, last, wait)
        self._stop.wait(wait)

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as e:  # handed to the training loop, which re-raises it
            self._put(e)

    def _produce(self) -> None:
        cfg = self.cfg
        self._enter_stage()  # a resume may start at a stage's first batch
        conn = self._connect()
        if not conn.extended:
            log.warning(
                "%s speaks only the core protocol: consumers share one stream handed out "
                "first come first served, so batches depend on timing and exact resume is off",
                self.url,
            )
        in_flight = 0
        held: dict[str, Any] | None = None
        failing_since: float | None = None  # first failure since the last good reply
        while not self._stop.is_set():
            try:
                while in_flight < cfg.requests_in_flight:
                    conn.request(cfg.samples_per_request)
                    in_flight += 1
                reply = conn.receive_data()
                in_flight -= 1
            except ServerRefused:
                raise
            except (OSError, TimeoutError, ConnectionError) as e:
                if self._stop.is_set():  # close() shut the connection: we are done
                    break
                # Gone, stalled (no reply within recv_timeout_s) or garbled: start again from
                # the last cursor whose samples we kept. Nothing is repeated or skipped.
                log.warning("consumer %d: lost %s (%s); reconnecting", self.k, self.url, e)
                conn.close()
                self.reconnects += 1
                failing_since = failing_since or time.monotonic()
                conn, in_flight = self._connect(failing_since), 0
                continue
            failing_since = None
            if reply.ended:
                log.info("consumer %d: the server ended the stream", self.k)
                if held is not None:
                    held["last"] = True  # lets every rank stop after the same step
                    self._put(held)
                self._put(_END)
                conn.close()
                return
            if reply.tokens is not None:
                self.wire.check_ids(reply.tokens, conn.url)
            tokens = reply.tokens if reply.tokens is not None else self.encode(reply.texts)
            self.packer.add(reply.ids, tokens)
            if reply.cursor is not None:
                self.cursor = reply.cursor
            while self.packer.ready():
                batch = self._pop()
                # One batch is held back until the next exists, so that the last one can say so.
                if held is not None and not self._put(held):
                    break
                held = batch
                if self._enter_stage():
                    conn.close()  # replies in flight belong to the stage before
                    conn, in_flight = self._connect(), 0
                    break
        conn.close()

    def _pop(self) -> dict[str, Any]:
        """The next batch, with the state after it and its tokens per mixture component."""
        components = self.packer.components()
        x, y, ids = self.packer.pop()
        self.batches += 1
        state = self.state()
        return {
            "x": x,
            "y": y,
            "ids": ids,
            "consumer": self.k,
            "state": state,
            "components": components,
        }

    def _enter_stage(self) -> bool:
        """Whether the next batch is trained in a later stage than the data in hand; if so the
        packer starts empty in that stage, and the stream must be reopened at self.cursor."""
        if self.stages is None or (stage := self.stages.stage_of(self.batches)) == self.stage:
            return False
        held = self.packer.state()
        log.info(
            "consumer %d: its batch %d is trained at step %d, in mixture stage %d: dropping the "
            "%d tokens (%d samples) left of stage %d",
            self.k,
            self.batches,
            self.stages.step_of(self.batches),
            stage,
            held["tokens"].size,
            len(held["ids"]),
            self.stage,
        )
        self.stage = stage
        self.packer = TokenPacker(self.rows, self.cfg.max_length)
        return True

    def state(self) -> dict[str, Any]:
        state = {"cursor": self.cursor, **self.packer.state()}
        if self.stages is not None:
            state.update(batches=self.batches, stage=self.stage)
        return state


# Every feed of this process, to stop its thread before the interpreter exits.
_FEEDS: weakref.WeakSet[ConsumerFeed] = weakref.WeakSet()


def close_feeds() -> None:
    """Stop and join the consumer threads of this process (end of training, and at exit)."""
    for feed in list(_FEEDS):
        feed.close()


atexit.register(close_feeds)


def _as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The producer's numpy arrays as tensors (no copy), in the iterating thread."""
    state = batch["state"]
    return {
        **batch,
        "x": torch.from_numpy(batch["x"]),
        "y": torch.from_numpy(batch["y"]),
        "state": {**state, "tokens": torch.from_numpy(state["tokens"])},
    }
