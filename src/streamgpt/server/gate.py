"""Who may open a connection, decided before the WebSocket upgrade: the path, the bearer token,
the connection limit. A refusal is an HTTP status with a line saying why (docs/PROTOCOL.md)."""

from __future__ import annotations

import hmac
import logging
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from streamgpt.server.config import LimitsConfig

log = logging.getLogger("streamgpt.server")


def peer(conn: ServerConnection) -> str:
    address = conn.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"


def admit(
    conn: ServerConnection,
    request: Request,
    path: str,
    token: str | None,
    limits: LimitsConfig,
    open_now: int,
) -> Response | None:
    """None to let the upgrade go on, or the HTTP response that refuses it."""
    if urlsplit(request.path).path != path:
        return conn.respond(HTTPStatus.NOT_FOUND, f"no stream at this path; use {path}\n")
    if token is not None:
        sent = request.headers.get("Authorization")
        if sent is None or not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            why = "no" if sent is None else "wrong"
            log.warning("refused %s: %s bearer token", peer(conn), why)
            response = conn.respond(
                HTTPStatus.UNAUTHORIZED,
                "missing or wrong token: send the header 'Authorization: Bearer <token>'\n",
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
    if open_now >= limits.max_connections:
        log.warning(
            "refused %s: at the limit of %d connections", peer(conn), limits.max_connections
        )
        return conn.respond(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"the server is at its limit of {limits.max_connections} connections "
            "(limits.max_connections); retry later\n",
        )
    return None
