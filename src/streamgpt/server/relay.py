"""Core-protocol sessions on a server of several processes (`workers: N`): relayed to worker 0.

Core clients (EIR) share one stream and one set of validation ids, and a `reset` from any of them
rewinds that stream for all. Only worker 0 keeps them. A core session that the kernel handed to
another worker is relayed to worker 0, frame by frame and in order, over a private loopback
WebSocket, so its client reads exactly what a server of one process gives it. The worker decides
from the handshake alone; consumers (handshakes with `consumer`) are served where they land.

Worker 0's private port accepts only the other workers: they present a secret made at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable
from http import HTTPStatus
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response

from streamgpt import __version__
from streamgpt.server import protocol

if TYPE_CHECKING:
    from streamgpt.server.app import Session, StreamServer

log = logging.getLogger("streamgpt.server")

# Close codes worker 0 sends (docs/PROTOCOL.md §4.2), passed on as they are; any other ending
# (worker 0 gone: 1006) reaches the client as 1011.
_PASSED_ON = frozenset({1000, 1001, 1008, 1009, 1011})


async def listen(server: StreamServer, secret: str) -> Server:
    """Worker 0's private port on loopback: its sessions are served as any other connection."""
    expected = f"Bearer {secret}".encode()

    def admit(conn: ServerConnection, request: Request) -> Response | None:
        sent = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(sent, expected):
            return conn.respond(HTTPStatus.UNAUTHORIZED, "this port is the server's own\n")
        return None

    return await serve(
        server._handle,
        "127.0.0.1",
        0,
        process_request=admit,
        compression=None,
        max_size=server.limits.max_frame_bytes,
        ping_interval=None,  # as the public port: worker 0 judges the session by its messages
        close_timeout=2,
        server_header=f"streamgpt/{__version__}",
    )


def private_url(relayed: Server, path: str) -> str:
    return f"ws://127.0.0.1:{relayed.sockets[0].getsockname()[1]}{path}"


class Relay:
    """A worker's side: each core session gets its own connection to worker 0."""

    def __init__(self, url: str, secret: str, worker: int) -> None:
        self.url, self.worker = url, worker
        self.headers = {"Authorization": f"Bearer {secret}"}

    async def __call__(self, ws: ServerConnection, session: Session, hello: str | bytes) -> None:
        try:
            upstream = await connect(
                self.url,
                additional_headers=self.headers,
                compression=None,
                max_size=None,  # replies are not limited (a batch can be tens of MB)
                ping_interval=None,
                open_timeout=10,
                close_timeout=2,
            )
        except (OSError, TimeoutError, InvalidHandshake) as e:
            # Worker 0 is gone (this worker follows it shortly) or overwhelmed: the client retries.
            log.error("connection #%d: worker 0 cannot be reached (%s)", session.number, e)
            text = "the server's worker 0 (the shared stream) cannot be reached; reconnect"
            await ws.send(protocol.error(text), text=True)
            await ws.close(1011)
            return
        log.info(
            "connection #%d from %s: core (shared stream), relayed to worker 0",
            session.number,
            session.peer,
        )
        async with upstream:
            await upstream.send(hello)
            await _pipe(ws, upstream, session)


async def _pipe(client: ServerConnection, upstream: ClientConnection, session: Session) -> None:
    """Frames both ways until one side closes; then the other is closed the same way."""

    async def up() -> None:
        async for frame in client:
            session.last_seen = time.monotonic()  # this worker's idle watchdog sees the client
            await upstream.send(frame)

    async def down() -> None:
        async for frame in upstream:
            session.bytes += len(frame)
            await client.send(frame)

    tasks = [asyncio.create_task(_quietly(up())), asyncio.create_task(_quietly(down()))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    if upstream.close_code is not None:  # worker 0 ended the session (or went away)
        code = upstream.close_code
        await client.close(code if code in _PASSED_ON else 1011, upstream.close_reason or "")
    else:
        await upstream.close()


async def _quietly(forwarding: Awaitable[None]) -> None:
    with contextlib.suppress(ConnectionClosed):  # either side's end is handled by _pipe
        await forwarding
