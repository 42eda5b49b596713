"""The stream server: protocol 1.0 on websockets' asyncio server.

One coroutine per connection reads requests and answers them in order, so pipelined requests
are answered in the order they came. Core-protocol clients (EIR) share one stream, handed out
first come first served; a client that sends a `consumer` in its handshake gets its own
deterministic stream and a cursor with every batch. Sources that read files or the network
build batches in a worker thread, so a slow read never stalls the other connections; a slow
reader only fills its own bounded write buffer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamgpt import __version__
from streamgpt.server import gate, protocol, report
from streamgpt.server.config import LimitsConfig
from streamgpt.server.corpus import IndexedCorpus, ShardedCorpus
from streamgpt.server.mixture import MixCorpus
from streamgpt.server.protocol import ProtocolError
from streamgpt.server.streams import (
    ConsumerSpec,
    CursorError,
    NothingLeft,
    StreamBase,
    open_stream,
)
from streamgpt.server.token_cache import TokenCache
from streamgpt.server.tokens import BinaryFrame, Tokenizers, TokenMode

log = logging.getLogger("streamgpt.server")

# relay.py's Relay: (connection, session, its handshake frame) -> the session, relayed to worker 0.
Relay = Callable[[ServerConnection, "Session", str | bytes], Awaitable[None]]


@dataclass
class Session:
    """One connection's state."""

    number: int
    peer: str
    consumer: ConsumerSpec | None = None
    stream: StreamBase | None = None  # own stream of a consumer; None reads the shared stream
    tokens: TokenMode | None = None  # tokens on the wire: how its getData replies are tokenized
    start: dict[str, Any] = field(default_factory=dict)  # how to reopen the stream on reset
    samples: int = 0
    bytes: int = 0
    opened: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)


class StreamServer:
    def __init__(
        self,
        corpus: IndexedCorpus | ShardedCorpus | MixCorpus,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        path: str = "/ws",
        seed: int = 0,
        output_name: str = "text_output",
        max_epochs: int | None = None,
        max_samples: int | None = None,
        limits: LimitsConfig | None = None,
        token: str | None = None,
        origins: list[str] | None = None,
        compression: bool = False,
        log_every_s: float = 30.0,
        token_cache: TokenCache | None = None,
    ) -> None:
        self.corpus = corpus
        self.host, self.port, self.path = host, port, path
        self.seed = seed
        self.max_epochs, self.max_samples = max_epochs, max_samples
        self.limits = limits or LimitsConfig()
        self.token = token or None
        self.origins = origins
        self.compression = compression
        self.log_every_s = log_every_s
        self._info = protocol.info_reply(output_name)
        # A server of several processes (workers.py) sets these: which process this is, whether
        # its sockets share the port, and how its core sessions reach worker 0 (relay.py).
        self.workers, self.worker, self.reuse_port = 1, 0, False
        self.relay: Relay | None = None
        self.relayed: Server | None = None  # worker 0's private port for the other workers
        self._validation_ids: frozenset[str] = frozenset()
        # Without a cache folder (the default here; build_server passes the config's) nothing is
        # kept on disk and every token frame is tokenized on the fly.
        self.token_cache = token_cache or TokenCache(None)
        self._tokenizers = Tokenizers(
            self.limits.max_tokenizer_bytes, self.token_cache.tokenizers_dir
        )
        self._numbers = itertools.count(1)
        self._connections: set[ServerConnection] = set()
        self._server: Server | None = None
        self._ticker: asyncio.Task | None = None
        self._started = time.monotonic()
        self.samples_served = 0
        self.bytes_served = 0
        # The shared stream of core-protocol clients. Resets rewind it; they do not undo an end
        # already reached, nor give back the samples a configured max_samples has counted.
        self._core_lock = asyncio.Lock()
        self._core_passed = 0  # positions passed by shared streams retired by a reset
        self._core_ended = False
        self._core = self._new_core_stream()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self.path}"

    async def start(self) -> StreamServer:
        origins = None if self.origins is None else [*self.origins, None]
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression="deflate" if self.compression else None,
            max_size=self.limits.max_frame_bytes,
            origins=origins,
            ping_interval=None,  # peers are judged by their messages: see limits.idle_timeout_s
            close_timeout=2,  # a peer that stops reading must not hold up a shutdown for long
            server_header=f"streamgpt/{__version__}",
            reuse_port=self.reuse_port,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(report.log_throughput(self))
        self._started = time.monotonic()
        return self

    async def stop(self, grace_s: float = 3.0) -> None:
        """Close every connection (1001) and stop listening; at most `grace_s` of waiting."""
        if self._ticker:
            self._ticker.cancel()
        if self._server:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), grace_s)
            except TimeoutError:
                # A peer that stopped reading leaves its close frame stuck behind a full write
                # buffer, and websockets waits for that buffer without a deadline: cut it off.
                for ws in list(self._connections):
                    ws.transport.abort()
                await self._server.wait_closed()

    # -- HTTP upgrade ------------------------------------------------------------------------

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        assert self._server is not None
        open_now = len(self._server.connections)
        return gate.admit(conn, request, self.path, self.token, self.limits, open_now)

    # -- connections -------------------------------------------------------------------------

    async def _recv(self, ws: ServerConnection, session: Session) -> str | bytes:
        frame = await ws.recv()
        session.last_seen = time.monotonic()
        return frame

    async def _close_when_idle(self, ws: ServerConnection, session: Session) -> None:
        # A watchdog rather than a timeout around every recv: no timer per message.
        idle = self.limits.idle_timeout_s
        while (left := session.last_seen + idle - time.monotonic()) > 0:
            await asyncio.sleep(left)
        log.info("connection #%d idle for %g s: closing", session.number, idle)
        await ws.close(1001, f"idle for {idle:g} s (limits.idle_timeout_s)")

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(next(self._numbers), gate.peer(ws))
        self._connections.add(ws)
        watchdog = asyncio.create_task(self._close_when_idle(ws, session))
        try:
            if await self._open(ws, session):
                await self._serve(ws, session)
        except ConnectionClosed:
            pass
        finally:
            watchdog.cancel()
            self._connections.discard(ws)
            elapsed = time.monotonic() - session.opened
            log.info(
                "connection #%d closed: %d samples, %.1f MB in %.1f s",
                session.number,
                session.samples,
                session.bytes / 1e6,
                elapsed,
            )

    async def _open(self, ws: ServerConnection, session: Session) -> bool:
        """The handshake. False if it failed (after an error message and a close), or if the
        session went to worker 0 and is over (a core session on another worker: relay.py)."""
        try:
            try:
                frame = await self._recv(ws, session)
                first = protocol.decode(frame)
            except ProtocolError as e:
                raise ProtocolError(
                    f"Incompatible protocol version: expected a handshake; {e}"
                ) from None
            hello = protocol.handshake(first)
            if hello.consumer is None and self.relay is not None:
                await self.relay(ws, session, frame)  # the shared stream is worker 0's
                return False
            if hello.consumer is not None:
                self._check_consumer(hello.consumer)
                if hello.tokens is not None:
                    eot = self.corpus.chunking.eot_marker
                    mode = await self._tokenizers.mode(hello.tokens, eot)
                    session.tokens = self.token_cache.use(self.corpus, mode)
                session.consumer = hello.consumer
                session.start = {"epoch": hello.epoch, "cursor": hello.cursor, "stage": hello.stage}
                session.stream = self._consumer_stream(hello.consumer, **session.start)
        except (ProtocolError, CursorError) as e:
            text = str(e) if isinstance(e, ProtocolError) else f"handshake: {e}"
            log.info("connection #%d from %s refused: %s", session.number, session.peer, text)
            await ws.send(protocol.error(text, **getattr(e, "fields", {})), text=True)
            await ws.close(1008, "handshake failed")
            return False
        await ws.send(protocol.handshake_reply(), text=True)
        if session.consumer is None:
            mode = "core (shared stream)"
        else:
            c = session.consumer
            mode = f"consumer {c.describe()} split={c.split}"
            mode += (
                " from cursor"
                if session.start["cursor"] is not None
                else f" epoch={session.start['epoch']}"
            )
            if session.start["stage"] is not None:
                mode += f" stage={session.start['stage']}"
            if session.tokens is not None:
                mode += f" tokens={session.tokens.dtype}"
        log.info("connection #%d from %s: %s", session.number, session.peer, mode)
        return True

    def _check_consumer(self, spec: ConsumerSpec) -> None:
        if spec.split == "validation":
            return
        c = self.corpus
        parts = zip(c.names, c.parts, strict=True) if isinstance(c, MixCorpus) else [("", c)]
        for name, corpus in parts:  # a mixture's consumers take a share of every component
            whose = f"component {name!r}" if name else "the corpus"
            if isinstance(corpus, ShardedCorpus):
                if spec.count > len(corpus.units) and spec.index == 0:
                    log.warning(
                        "%d consumers share %d units of %s: consumers on the same unit each "
                        "read all of it and keep their share of its rows; "
                        "source.shard_by=row_group avoids that",
                        spec.count,
                        len(corpus.units),
                        whose,
                    )
                continue
            n = int(corpus.train_ids.size)
            if spec.count > n:
                raise ProtocolError(
                    f"handshake: {spec.count} consumers (world_size x num_workers) but {whose} "
                    f"has only {n} training documents; use at most {n} consumers or a larger corpus"
                )

    def _consumer_stream(self, spec: ConsumerSpec, **start: Any) -> StreamBase:
        return open_stream(
            self.corpus,
            spec,
            **start,  # epoch, cursor, stage
            max_epochs=self.max_epochs,
            max_samples=self.max_samples,
        )

    def _new_core_stream(self) -> StreamBase:
        remaining = None if self.max_samples is None else self.max_samples - self._core_passed
        return open_stream(
            self.corpus,
            ConsumerSpec(seed=self.seed, index=0, count=1),
            max_epochs=self.max_epochs,
            max_samples=remaining,
        )

    async def _serve(self, ws: ServerConnection, session: Session) -> None:
        while True:
            frame = await self._recv(ws, session)
            try:
                replies = await self._answer(session, protocol.decode(frame))
            except ProtocolError as e:
                replies = (protocol.error(str(e)),)
            for reply in replies:
                await ws.send(reply, text=not isinstance(reply, BinaryFrame))

    async def _answer(self, session: Session, msg: dict[str, Any]) -> tuple[bytes, ...]:
        kind = msg["type"]
        if kind == "getData":
            return (
                await self._data(session, protocol.batch_size(msg, self.limits.max_batch_size)),
            )
        if kind == "heartbeat":
            return (protocol.HEARTBEAT,)
        if kind == "putTokenizer":
            return (await self._tokenizers.put(msg),)
        if kind == "getInfo":
            return (self._info,)
        if kind == "status":
            return (protocol.encode({"type": "status", "payload": self.status()}),)
        if kind == "reset":
            await self._reset(session)
            return protocol.RESET_REPLIES
        if kind == "setValidationIds":
            ids = protocol.validation_ids(msg)
            # Union, not replace (EIR's reference server replaces): with two EIR runs on one
            # server, the second run's ids must not let the first run's leak into training.
            merged = self._validation_ids.union(ids)
            if len(merged) > self.limits.max_validation_ids:
                raise ProtocolError(
                    f"setValidationIds: {len(merged)} validation ids would exceed the server's "
                    f"limit of {self.limits.max_validation_ids} (limits.max_validation_ids)"
                )
            self._validation_ids = merged
            log.info(
                "connection #%d: %d validation ids (%d held)", session.number, len(ids), len(merged)
            )
            return (protocol.validation_confirmation(len(ids)),)
        if kind == "handshake":
            raise ProtocolError("handshake: this connection has already completed its handshake")
        raise ProtocolError(
            f"unknown message type {kind[:60]!r}; accepted types: {protocol._ACCEPTED}"
        )

    async def _data(self, session: Session, n: int) -> bytes:
        if session.stream is not None:
            samples, cursor = await self._fill(session.stream, n)
        else:
            async with self._core_lock:
                if self._core_ended:
                    samples, cursor = [], self._core.cursor()
                else:
                    samples, cursor = await self._fill(self._core, n)
                    if len(samples) < n:
                        self._core_ended = True
                        log.info("the shared stream reached its configured end")
        if session.tokens is not None and samples:  # the end stays a JSON terminate
            reply = await asyncio.to_thread(session.tokens.frame, samples, cursor)
        else:
            reply = protocol.data_reply(samples, cursor)
        session.samples += len(samples)
        session.bytes += len(reply)
        self.samples_served += len(samples)
        self.bytes_served += len(reply)
        return reply

    async def _fill(self, stream: StreamBase, n: int) -> tuple[list[bytes], dict[str, Any]]:
        try:
            if stream.blocking_io:
                return await asyncio.to_thread(stream.payloads, n, self._validation_ids)
            return stream.payloads(n, self._validation_ids)
        except NothingLeft as e:
            raise ProtocolError(str(e)) from None

    async def _reset(self, session: Session) -> None:
        if session.stream is not None:
            session.stream = self._consumer_stream(session.consumer, **session.start)
            return
        async with self._core_lock:
            self._core_passed += self._core.cursor()["n"]
            self._core = self._new_core_stream()

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return report.status(self)
