"""The server under load and under abuse, as a separate process whose memory we can watch."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import zlib

import orjson
import psutil
import pytest
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamgpt.server.process import ServerProcess

from .helpers.corpora import text


def many_documents(folder, n=200):
    import random

    rng = random.Random(3)
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(text(rng, rng.choice([300, 800, 1500])))
    return folder


def rss_mb(proc) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 1e6


def steady_rss(proc, limit: float, timeout: float = 20.0) -> float:
    """The process's RSS once it stops changing (2 s within 1 MB), or as soon as it passes limit."""
    readings: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now, rss = time.monotonic(), rss_mb(proc)
        readings.append((now, rss))
        if rss > limit:
            return rss
        recent = [r for t, r in readings if now - t <= 2.0]
        if now - readings[0][0] >= 2.0 and max(recent) - min(recent) < 1.0:
            return rss
        time.sleep(0.2)  # the sampling period
    return readings[-1][1]


@pytest.mark.slow
def test_64_consumers_for_60_seconds_are_served_fairly_in_bounded_memory(tmp_path):
    corpus = many_documents(tmp_path / "corpus")
    overrides = [
        "source=files",
        f"source.paths=[{corpus}]",
        "chunk.words=128",
        f"hydra.run.dir={tmp_path / 'server'}",
    ]
    with ServerProcess(overrides) as server:
        counts: dict[int, int] = {}
        errors: list[BaseException] = []
        memory: list[float] = []

        async def consume(k: int, deadline: float) -> None:
            async with async_connect(server.url, max_size=None, compression=None) as ws:
                hello = {
                    "type": "handshake",
                    "version": "1.0",
                    "consumer": {"rank": k, "world_size": 64, "seed": 1},
                }
                await ws.send(orjson.dumps(hello).decode())
                assert orjson.loads(await ws.recv())["type"] == "handshake"
                while time.monotonic() < deadline:
                    await ws.send('{"type": "getData", "payload": {"batch_size": 8}}')
                    reply = orjson.loads(await ws.recv())
                    assert reply["type"] == "data" and len(reply["payload"]) == 8, reply
                    counts[k] = counts.get(k, 0) + 8

        async def watch(deadline: float) -> None:
            while time.monotonic() < deadline:
                memory.append(rss_mb(server.proc))
                await asyncio.sleep(1)

        async def main() -> None:
            deadline = time.monotonic() + 60
            results = await asyncio.gather(
                watch(deadline), *(consume(k, deadline) for k in range(64)), return_exceptions=True
            )
            errors.extend(r for r in results if isinstance(r, BaseException))

        started = time.monotonic()
        thread = threading.Thread(target=asyncio.run, args=(main(),))
        thread.start()
        thread.join(120)
        elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert sorted(counts) == list(range(64)), "every consumer served"
    slowest, fastest = min(counts.values()), max(counts.values())
    rate = sum(counts.values()) / elapsed
    print(
        f"\n64 consumers, 60 s: {rate:.0f} samples/s; per consumer {slowest}-{fastest} "
        f"({slowest / fastest:.4f}); server RSS {min(memory):.0f}-{max(memory):.0f} MB"
    )
    # README: slowest/fastest 0.9996, 46,000 samples/s, RSS 52-56 MB. The bounds leave room for a
    # loaded machine; serving one consumer twice as often, or a leak, fails them.
    assert slowest / fastest >= 0.98, f"unfair: {slowest} vs {fastest} samples"
    assert rate >= 10_000, f"only {rate:.0f} samples/s"
    assert max(memory) - min(memory) < 20, f"server memory grew: {memory}"


def test_a_client_that_stops_reading_leaves_server_memory_flat(tmp_path):
    with ServerProcess([f"hydra.run.dir={tmp_path / 'server'}"]) as server:
        ws = connect(server.url, max_size=None, compression=None, legacy=True)
        ws.send('{"type": "handshake", "version": "1.0"}')
        ws.recv()
        before = rss_mb(server.proc)
        request = b'{"type": "getData", "payload": {"batch_size": 4096}}'
        sent = 0
        ws.socket.settimeout(5)
        try:
            for _ in range(2000):  # ~48 GB of replies if the server buffered them all
                ws.send(request, text=True)
                sent += 1
        except (OSError, ConnectionClosed):
            pass  # our own send timed out: the server stopped reading us, as it should
        # The server answers what it can send: until its memory is steady (or over the bound).
        after = steady_rss(server.proc, limit=before + 200)
        other = connect(server.url, max_size=None, compression=None, legacy=True)
        other.send('{"type": "handshake", "version": "1.0", "consumer": {"seed": 1}}')
        other.recv()
        other.send('{"type": "getData", "payload": {"batch_size": 2}}')
        assert len(orjson.loads(other.recv(timeout=10))["payload"]) == 2
        other.close()
        ws.socket.shutdown(socket.SHUT_RDWR)
    # 2000 requests of ~24 MB of replies each (48 GB): memory is bounded by the few replies in
    # flight (one being written, the transport's buffer; ~100 MB seen), not by the requests.
    print(f"\nunread client: server RSS {before:.0f} -> {after:.0f} MB after {sent} requests")
    assert after - before < 200, f"server RSS {before:.0f} -> {after:.0f} MB after {sent} requests"


def test_with_compression_on_a_small_frame_cannot_inflate_past_the_limit(tmp_path):
    overrides = ["compression=true", "limits.max_frame_bytes=65536", f"hydra.run.dir={tmp_path}"]
    with ServerProcess(overrides) as server:
        ws = connect(server.url, compression="deflate", max_size=None, legacy=True)
        ws.send('{"type": "handshake", "version": "1.0"}')
        ws.recv()
        before = rss_mb(server.proc)
        bomb = '{"type": "heartbeat", "pad": "' + "a" * (200 << 20) + '"}'
        assert len(zlib.compress(bomb.encode())) < 300_000  # 200 MB that travels as ~200 kB
        ws.send(bomb)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1009
        grown = rss_mb(server.proc) - before
    assert grown < 50, f"the server inflated the frame: its RSS grew by {grown:.0f} MB"


def test_the_default_bind_is_loopback_only(tmp_path):
    with ServerProcess([f"hydra.run.dir={tmp_path}"]) as server:  # no host= given
        listening = [
            c.laddr
            for c in psutil.Process(server.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ]
    assert [address.ip for address in listening] == ["127.0.0.1"], listening
