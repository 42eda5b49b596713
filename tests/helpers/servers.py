"""Servers and clients for the tests: a StreamServer in this process, a raw protocol client,
and the stream client's config with small test sizes."""

from __future__ import annotations

import asyncio
import threading

import orjson
from websockets.sync.client import ClientConnection, connect

from streamgpt.data import RetryConfig, StreamConfig
from streamgpt.server import StreamServer


class RunningServer:
    """A StreamServer on its own event loop in a background thread, listening on a free port."""

    def __init__(self, server: StreamServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(server.start())

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Client:
    """A protocol client on websockets' sync API: JSON in, JSON out."""

    def __init__(self, url: str, **options) -> None:
        options.setdefault("max_size", None)  # batches of hundreds of samples exceed 1 MiB
        self.ws: ClientConnection = connect(url, legacy=True, **options)

    def send(self, message: dict | str | bytes) -> None:
        self.ws.send(orjson.dumps(message).decode() if isinstance(message, dict) else message)

    def recv(self, timeout: float = 10) -> dict:
        return orjson.loads(self.ws.recv(timeout))

    def ask(self, message: dict | str | bytes, timeout: float = 10) -> dict:
        self.send(message)
        return self.recv(timeout)

    def handshake(self, consumer: dict | None = None) -> dict:
        hello = {"type": "handshake", "version": "1.0", "worker_id": 0}
        if consumer is not None:
            hello["consumer"] = consumer
        reply = self.ask(hello)
        assert reply["type"] == "handshake", reply
        return reply

    def data(self, batch_size: int) -> dict:
        reply = self.ask({"type": "getData", "payload": {"batch_size": batch_size}})
        assert reply["type"] == "data", reply
        return reply

    def close(self) -> None:
        self.ws.close()


def ids(reply: dict) -> list[str]:
    return [s["sample_id"] for s in reply["payload"] if s != "terminate"]


def stream_cfg(url, **overrides) -> StreamConfig:
    options = {
        "url": url,
        "batch_size": 4,
        "max_length": 32,
        "valid_size": 16,
        "streaming_setup_samples": 300,
        "samples_per_request": 4,
        "retry": RetryConfig(budget_s=30, backoff_s=0.2, max_backoff_s=1.0),
    }
    return StreamConfig(**{**options, **overrides})
