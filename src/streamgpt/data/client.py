"""The trainer's side of the wire: one WebSocket connection speaking protocol 1.0.

Blocking (websockets' sync client): each consumer runs its connection in a background thread.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from streamgpt.data.token_frame import FrameError, read_frame
from streamgpt.wire import PROTOCOL_VERSION


class StreamError(RuntimeError):
    """The stream cannot go on; the message says why and what to do."""


class ServerRefused(StreamError):
    """The server answered, but refuses us (a bad token, a bad request): retrying will not help."""


class UnknownTokenizer(ServerRefused):
    """Tokens on the wire: the server does not hold our tokenizer yet (putTokenizer uploads it)."""


def no_server(url: str, cause: BaseException | str) -> str:
    return (
        f"no stream server at {url} ({cause}); start one with `make serve` "
        "(or let training start the embedded one: leave data.stream.url unset)"
    )


@dataclass
class Reply:
    ids: list[str]
    texts: list[str]
    cursor: dict[str, Any] | None
    ended: bool
    tokens: list[np.ndarray] | None = None  # tokens on the wire: each sample's ids, no texts


def token_from_env(name: str | None) -> str | None:
    return os.environ.get(name) or None if name else None


class Connection:
    """A handshaken connection; `extended` says whether the server speaks the extensions."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        connect_timeout: float = 10.0,
        recv_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.token = token
        self.connect_timeout = connect_timeout
        self.recv_timeout = recv_timeout
        self.ws: ClientConnection | None = None
        self.extended = False
        self.tokens = False  # the server sends our getData replies as token frames

    def open(self, consumer: dict[str, Any] | None = None) -> Connection:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self.ws = connect(
                self.url,
                open_timeout=self.connect_timeout,
                close_timeout=1,
                max_size=None,  # replies of hundreds of samples; we asked for them
                compression=None,
                additional_headers=headers,
                legacy=True,
            )
        except InvalidStatus as e:
            code = e.response.status_code
            body = e.response.body.decode(errors="replace").strip()
            if code == 401:
                raise ServerRefused(
                    f"the stream server at {self.url} refused our token ({body}); export the "
                    "server's token in the variable named by data.stream.token_env"
                ) from None
            raise ConnectionError(f"HTTP {code}: {body}") from None
        except InvalidURI as e:
            raise ServerRefused(f"data.stream.url {self.url!r} is not a ws:// URL ({e})") from None
        except InvalidHandshake as e:  # e.g. the server went away mid-upgrade
            raise ConnectionError(f"the WebSocket upgrade failed ({e})") from None
        hello: dict[str, Any] = {"type": "handshake", "version": PROTOCOL_VERSION, "worker_id": 0}
        if consumer is not None:
            hello["consumer"] = consumer
        reply = self._ask(hello)
        if reply.get("type") != "handshake":
            self.close()
            payload = reply.get("payload")
            unknown = isinstance(payload, dict) and "unknown_tokenizer" in payload
            refused = UnknownTokenizer if unknown else ServerRefused
            raise refused(f"{self.url} refused the handshake: {_error_text(reply)}")
        extensions = reply.get("extensions") or []
        self.extended = "consumer" in extensions
        self.tokens = "tokens" in (consumer or {}) and "tokens" in extensions
        return self

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    # Every failure of the connection itself surfaces as ConnectionError, OSError or TimeoutError:
    # the ones a consumer answers by reconnecting.

    def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        try:
            self.ws.send(orjson.dumps(message).decode())
        except ConnectionClosed as e:
            raise ConnectionError(f"connection closed ({e})") from None

    def receive(self) -> dict[str, Any]:
        return self._json(self._frame())

    def _frame(self) -> str | bytes:
        assert self.ws is not None
        try:
            return self.ws.recv(timeout=self.recv_timeout)
        except ConnectionClosed as e:
            raise ConnectionError(f"connection closed ({e})") from None
        except TimeoutError:
            raise TimeoutError(f"no reply within {self.recv_timeout:g} s") from None

    def _json(self, frame: str | bytes) -> dict[str, Any]:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError as e:
            raise ConnectionError(f"{self.url} sent a frame that is not JSON ({e})") from None
        if not isinstance(message, dict):
            raise ConnectionError(f"{self.url} sent a message that is not a JSON object")
        return message

    def request(self, batch_size: int) -> None:
        self.send({"type": "getData", "payload": {"batch_size": batch_size}})

    def receive_data(self) -> Reply:
        frame = self._frame()
        if self.tokens and isinstance(frame, bytes):  # a token frame; errors and the end are JSON
            try:
                tokens = read_frame(frame)
            except FrameError as e:
                raise ConnectionError(f"{self.url} sent a malformed token frame: {e}") from None
            return Reply(tokens.ids, [], tokens.cursor, ended=False, tokens=tokens.tokens)
        message = self._json(frame)
        kind = message.get("type")
        if kind == "error":
            raise ServerRefused(f"the stream server at {self.url} said: {_error_text(message)}")
        payload = message.get("payload")
        if kind != "data" or not isinstance(payload, list):
            raise ConnectionError(f"{self.url} answered getData with {str(message)[:200]}")
        if not payload or payload == ["terminate"]:
            return Reply([], [], message.get("cursor"), ended=True)
        try:
            texts = [next(iter(s["inputs"].values())) for s in payload]
            ids = [s["sample_id"] for s in payload]
        except (KeyError, TypeError, AttributeError, StopIteration):
            raise ConnectionError(f"{self.url} sent samples not in the protocol's shape") from None
        return Reply(ids, texts, message.get("cursor"), ended=False)

    def status(self) -> dict[str, Any]:
        reply = self._ask({"type": "status", "payload": {}})
        if reply.get("type") != "status":
            raise ConnectionError(f"{self.url} answered status with {str(reply)[:200]}")
        return reply.get("payload") or {}

    def set_validation_ids(self, ids: list[str]) -> None:
        reply = self._ask({"type": "setValidationIds", "payload": {"validation_ids": ids}})
        if reply.get("type") != "validationIdsConfirmation":
            raise ServerRefused(f"{self.url} did not accept validation ids: {_error_text(reply)}")

    def put_tokenizer(self, sha256: str, tokenizer_json: str) -> None:
        """Upload a tokenizer.json (tokens on the wire). A refusal raises ServerRefused: an
        `error` reply, or a close 1009 for a request over the server's limits.max_frame_bytes."""
        try:
            reply = self._ask(put_tokenizer_request(sha256, tokenizer_json))
        except OSError:
            if self.ws is None or self.ws.close_code != 1009:
                raise  # the connection failed: the consumer reconnects and uploads again
            raise ServerRefused(
                f"the stream server at {self.url} closed the connection (1009, message too big) "
                f"on our putTokenizer: {self.ws.close_reason} (limits.max_frame_bytes)"
            ) from None
        if reply.get("type") != "tokenizerConfirmation":
            raise ServerRefused(f"{self.url} did not accept our tokenizer: {_error_text(reply)}")

    def close(self) -> None:
        if self.ws is not None:
            # Closing a connection that already failed: nothing is left to do about it.
            with contextlib.suppress(Exception):
                self.ws.close()
            self.ws = None


def put_tokenizer_request(sha256: str, tokenizer_json: str) -> dict[str, Any]:
    return {"type": "putTokenizer", "payload": {"sha256": sha256, "tokenizer_json": tokenizer_json}}


def _error_text(message: dict[str, Any]) -> str:
    payload = message.get("payload")
    if isinstance(payload, dict) and "message" in payload:
        return str(payload["message"])
    return str(message)[:300]
