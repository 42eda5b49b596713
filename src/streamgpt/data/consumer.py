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
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from streamgpt.data.client import Connection, ServerRefused, StreamError
from streamgpt.data.packing import TokenPacker

log = logging.getLogger("streamgpt.data")

_END = object()  # the stream reached the server's configured end


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
    ) -> None:
        self.url = url
        self.consumer = consumer
        self.k = consumer["rank"] * consumer["num_workers"] + consumer["worker"]
        self.cfg = cfg
        self.encode = encode
        self.token = token
        self.cursor = state["cursor"] if state else None
        self.packer = TokenPacker(cfg.batch_size, cfg.max_length, state)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"stream-consumer-{self.k}", daemon=True
        )
        self.reconnects = 0
        self._conn: Connection | None = None  # the open connection, for close() to interrupt

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _FEEDS.add(self)
        self._thread.start()
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
            try:
                self._conn = conn.open({**self.consumer, "cursor": self.cursor})
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
        conn = self._connect()
        warned_core = False
        in_flight = 0
        held: dict[str, Any] | None = None
        failing_since: float | None = None  # first failure since the last good reply
        while not self._stop.is_set():
            if not conn.extended and not warned_core:
                log.warning(
                    "%s speaks only the core protocol: consumers share one stream handed out "
                    "first come first served, so batches depend on timing and exact resume is off",
                    self.url,
                )
                warned_core = True
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
            self.packer.add(reply.ids, self.encode(reply.texts))
            if reply.cursor is not None:
                self.cursor = reply.cursor
            while self.packer.ready():
                components = self.packer.components()  # tokens per mixture component
                x, y, ids = self.packer.pop()
                batch = {"x": x, "y": y, "ids": ids, "consumer": self.k, "state": self.state()}
                batch["components"] = components
                # One batch is held back until the next exists, so that the last one can say so.
                if held is not None and not self._put(held):
                    break
                held = batch
        conn.close()

    def state(self) -> dict[str, Any]:
        return {"cursor": self.cursor, **self.packer.state()}


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
