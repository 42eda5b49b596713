"""Limits, auth, slow peers and concurrent load."""

import asyncio
import logging
import socket
import threading
import time

import orjson
import pytest
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamgpt.server.config import LimitsConfig
from streamgpt.server.corpus import Chunking, SampleEncoder, ShardedCorpus

from .helpers.servers import Client, ids


def test_status_reports_the_limits(serve, client, shakespeare):
    limits = LimitsConfig(
        max_frame_bytes=1000,
        max_batch_size=7,
        max_connections=9,
        idle_timeout_s=99,
        max_tokenizer_bytes=5000,
    )
    server = serve(shakespeare, limits=limits)
    status = client(server.url).ask({"type": "status", "payload": {}})["payload"]
    assert status["limits"] == {
        "max_frame_bytes": 1000,
        "max_batch_size": 7,
        "max_connections": 9,
        "idle_timeout_s": 99,
        "max_validation_ids": 1_000_000,
        "max_tokenizer_bytes": 5000,
    }
    assert status["corpus"]["documents"] == 42 and status["active_connections"] == 1


def test_the_connection_past_the_cap_is_refused_with_503(serve, client, shakespeare):
    server = serve(shakespeare, limits=LimitsConfig(max_connections=3))
    held = [client(server.url) for _ in range(3)]
    with pytest.raises(InvalidStatus) as refused:
        Client(server.url)
    assert refused.value.response.status_code == 503
    assert b"limits.max_connections" in refused.value.response.body
    held[0].close()
    deadline = time.monotonic() + 5
    while len(server.server._server.connections) > 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(ids(client(server.url).data(2))) == 2


def test_a_silent_client_is_dropped_after_the_idle_timeout(serve, client, shakespeare):
    server = serve(shakespeare, limits=LimitsConfig(idle_timeout_s=0.5))
    silent, chatty = client(server.url), client(server.url)
    for _ in range(8):  # 1.6 s of heartbeats, well past the timeout
        assert chatty.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
        time.sleep(0.2)
    with pytest.raises(ConnectionClosed) as closed:
        silent.recv(timeout=5)
    assert closed.value.rcvd.code == 1001
    assert "idle" in closed.value.rcvd.reason


def test_bearer_token_is_checked_before_the_upgrade_and_never_logged(serve, shakespeare, caplog):
    server = serve(shakespeare, token="s3cret-t0ken")
    caplog.set_level(logging.INFO, logger="streamgpt.server")
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-t0ken"}):
        with pytest.raises(InvalidStatus) as refused:
            Client(server.url, additional_headers=headers)
        assert refused.value.response.status_code == 401
    ok = Client(server.url, additional_headers={"Authorization": "Bearer s3cret-t0ken"})
    ok.handshake()
    assert len(ids(ok.data(3))) == 3
    ok.close()
    assert "refused" in caplog.text and "s3cret" not in caplog.text


def test_an_origin_allow_list_refuses_other_browsers(serve, shakespeare):
    server = serve(shakespeare, origins=["https://lab.example.org"])
    with pytest.raises(InvalidStatus) as refused:
        Client(server.url, origin="https://evil.example.com")
    assert refused.value.response.status_code == 403
    for origin in ("https://lab.example.org", None):  # non-browser clients send no Origin
        c = Client(server.url, origin=origin)
        c.handshake()
        c.close()


def test_a_client_that_stops_reading_does_not_stall_others_or_grow_buffers(
    serve, client, shakespeare
):
    server = serve(shakespeare)
    slow = client(server.url)
    for _ in range(200):  # ~600 MB of replies it will never read
        slow.send({"type": "getData", "payload": {"batch_size": 500}})
    other = client(server.url, {"seed": 1})
    started = time.monotonic()
    for _ in range(20):
        assert len(ids(other.data(100))) == 100
    assert time.monotonic() - started < 10
    buffered = max(c.transport.get_write_buffer_size() for c in server.server._server.connections)
    assert buffered < 8 << 20, f"{buffered} bytes buffered for a peer that is not reading"
    slow.ws.socket.shutdown(socket.SHUT_RDWR)  # hang up without reading the backlog


def _slow_corpus(delay: float) -> tuple[ShardedCorpus, threading.Event]:
    """Two units; the one consumer 0 of 2 reads first waits on a slow network for every row.
    The event is set once that slow read has begun."""
    reading = threading.Event()

    def read_unit(unit, first_row):
        for row in range(first_row, 50):
            if unit == slow_unit:
                reading.set()
                time.sleep(delay)  # the slow network
            yield row, f"u{unit}-{row}", f"document {row} of unit {unit} " * 10

    corpus = ShardedCorpus(
        "slow",
        ["unit-0", "unit-1"],
        read_unit,
        chunking=Chunking(words=8),
        encoder=SampleEncoder(),
        validation_fraction=0.0,
        min_words=1,
        window=4,
        description={"source": "slow"},
    )
    slow_unit = corpus.consumer_units(seed=0, epoch=0, k=0, count=2)[0][0]
    return corpus, reading


def test_a_slow_dataset_read_does_not_block_other_connections(serve, client):
    corpus, reading = _slow_corpus(delay=0.5)
    server = serve(corpus)
    slow = client(server.url, {"rank": 0, "world_size": 2})
    slow.send({"type": "getData", "payload": {"batch_size": 20}})  # waits ~2 s on unit 0
    assert reading.wait(10), "the slow read began"
    started = time.monotonic()
    fast = client(server.url, {"rank": 1, "world_size": 2})
    fast.ask({"type": "heartbeat"})
    assert len(ids(fast.data(5))) == 5
    assert time.monotonic() - started < 1.0, "the event loop waited for another consumer's read"
    assert len(ids(slow.recv(timeout=30))) == 20


def test_32_concurrent_consumers_are_all_served(serve, shakespeare):
    server = serve(shakespeare)
    counts: dict[int, int] = {}
    errors: list[BaseException] = []

    async def consume(k: int) -> None:
        async with async_connect(server.url, max_size=None, compression=None) as ws:
            hello = {
                "type": "handshake",
                "version": "1.0",
                "consumer": {"rank": k, "world_size": 32},
            }
            await ws.send(orjson.dumps(hello).decode())
            assert orjson.loads(await ws.recv())["type"] == "handshake"
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                await ws.send('{"type": "getData", "payload": {"batch_size": 16}}')
                reply = orjson.loads(await ws.recv())
                assert reply["type"] == "data", reply
                assert len(reply["payload"]) == 16
                counts[k] = counts.get(k, 0) + 16

    async def main() -> None:
        results = await asyncio.gather(*(consume(k) for k in range(32)), return_exceptions=True)
        errors.extend(r for r in results if isinstance(r, BaseException))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    thread.join(60)
    assert not errors, errors[:3]
    assert sorted(counts) == list(range(32)) and min(counts.values()) > 0
