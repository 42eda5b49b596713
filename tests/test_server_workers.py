"""A server of several processes on one port (`workers=2`): real server processes on loopback.

The kernel deals each new connection to one of the processes listening on the port (SO_REUSEPORT,
a hash of the connection's addresses), so which worker a connection reaches is chance. Each test
that needs connections on both workers opens enough of them that the chance of all landing on one
is negligible, and checks from `status.worker` that they did not.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import psutil
import pytest

from streamgpt.server.process import ServerProcess

from .helpers.servers import Client, ids
from .helpers.tokens import EOS, sha, small_bpe
from .test_eir_session import eir_session

# With 2 workers and a uniform hash, n connections all land on one worker with probability
# 2 * 2**-n: 16 connections, 3e-5.
CONNECTIONS = 16


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Iterator[ServerProcess]:
    with ServerProcess([f"hydra.run.dir={tmp_path_factory.mktemp('one')}"]) as server:
        yield server


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Iterator[ServerProcess]:
    run_dir = tmp_path_factory.mktemp("two")
    with ServerProcess(["workers=2", f"hydra.run.dir={run_dir}"]) as server:
        yield server


@pytest.fixture
def fresh(tmp_path) -> Iterator[ServerProcess]:
    """workers=2 with a shared stream nobody has read yet."""
    with ServerProcess(["workers=2", f"hydra.run.dir={tmp_path / 'fresh'}"]) as server:
        yield server


def status(c: Client) -> dict:
    return c.ask({"type": "status", "payload": {}})["payload"]


def frames(c: Client, batches: int, size: int) -> list[str]:
    """The raw text of `batches` data replies, as the server sent them."""
    out = []
    for _ in range(batches):
        c.send({"type": "getData", "payload": {"batch_size": size}})
        out.append(c.ws.recv(10))
    return out


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    """Worker 0's children that are workers (multiprocessing's resource tracker is not)."""
    children = psutil.Process(server.proc.pid).children()
    return [p for p in children if "spawn_main" in " ".join(p.cmdline())]


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_port_zero_resolves_to_one_port_where_every_worker_listens(two):
    assert two.port and two.port > 0
    procs = [psutil.Process(two.proc.pid), *workers_of(two)]
    assert len(procs) == 2
    for proc in procs:
        listening = {c.laddr.port for c in proc.net_connections("tcp") if c.status == "LISTEN"}
        assert two.port in listening, (proc.pid, listening)


def test_consumers_on_either_worker_get_the_bytes_one_process_sends(one, two):
    seen = Counter()
    for k in range(CONNECTIONS):
        consumer = {"rank": k, "world_size": CONNECTIONS, "seed": 3}
        here, there = Client(two.url), Client(one.url)
        try:
            here.handshake(consumer)
            there.handshake(consumer)
            report = status(here)
            assert report["workers"] == 2
            seen[report["worker"]] += 1
            if report["worker"] != 0:  # the shared stream is worker 0's alone
                assert report["shared_cursor"] is None and report["current_position"] is None
            assert frames(here, 3, 7) == frames(there, 3, 7), f"consumer {k}"
        finally:
            here.close()
            there.close()
    assert set(seen) == {0, 1}, seen


def test_a_consumer_reconnecting_to_any_worker_continues_exactly(one, two):
    consumer = {"rank": 1, "world_size": 3, "seed": 5}
    reference = Client(one.url)
    reference.handshake(consumer)
    expected = [i for _ in range(24) for i in ids(reference.data(5))]
    reference.close()

    got, workers, cursor = [], [], None
    for _ in range(24):  # all on one worker: 2 * 2**-24
        c = Client(two.url)
        c.handshake({**consumer, "cursor": cursor})
        workers.append(status(c)["worker"])
        reply = c.data(5)
        got += ids(reply)
        cursor = reply["cursor"]
        c.close()
    assert set(workers) == {0, 1}, workers
    assert got == expected


def _shared_ids(url: str, count: int) -> list[str]:
    c = Client(url)
    c.handshake()
    out = ids(c.data(count))
    c.close()
    return out


def test_core_clients_on_both_workers_read_one_shared_stream(fresh, tmp_path):
    clients = [Client(fresh.url) for _ in range(CONNECTIONS)]
    for c in clients:
        c.handshake()
    # Every status of a core session is worker 0's; it counts the sessions other workers relay.
    relayed = status(clients[0])["relayed_connections"]
    assert 0 < relayed < CONNECTIONS, relayed
    got: list[list[str]] = [[] for _ in clients]

    def read(i: int) -> None:
        for _ in range(6):
            got[i] += ids(clients[i].data(5))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    total = CONNECTIONS * 6 * 5
    with ServerProcess([f"hydra.run.dir={tmp_path / 'one'}"]) as single:
        expected = _shared_ids(single.url, total)
    flat = [i for reads in got for i in reads]
    assert len(flat) == total and Counter(flat) == Counter(expected), "none twice, none skipped"
    assert all(reads == sorted(reads, key=expected.index) for reads in got), "each in order"


def _a_relayed_core_client(url: str) -> Client:
    """A core connection that another worker relays to worker 0 (found among fresh ones)."""
    for _ in range(CONNECTIONS):
        c = Client(url)
        c.handshake()
        if status(c)["relayed_connections"] == 1:  # only this one is open: it is relayed
            return c
        c.close()
    raise AssertionError(f"none of {CONNECTIONS} core connections was relayed")


def test_validation_ids_sent_through_a_relayed_connection_filter_the_shared_stream(fresh, one):
    first = _shared_ids(one.url, 40)  # the shared stream of a fresh server
    relayed = _a_relayed_core_client(fresh.url)
    reply = relayed.ask({"type": "setValidationIds", "payload": {"validation_ids": first[5:15]}})
    assert reply["type"] == "validationIdsConfirmation"
    assert status(relayed)["validation_ids_count"] == 10
    batch = ids(relayed.data(30))
    relayed.close()
    assert batch == first[:5] + first[15:40]


def test_an_eir_session_over_several_connections_on_two_workers(fresh):
    setup, validation, trained = eir_session(
        fresh.url, setup_samples=64, batch=16, valid=16, steps=20, seed=0
    )
    flat = [i for batch in trained for i in batch]
    assert len(flat) == 320 and len(set(flat)) == 320
    assert not set(validation) & set(flat), "a validation id reached training"
    assert set(setup) - set(validation) <= set(flat), "training starts over after the reset"
    # Whichever worker each of its connections reached, the session's state is worker 0's and
    # every core connection sees it (one on worker 1, unrelayed, would see a stream of its own).
    for _ in range(CONNECTIONS):
        c = Client(fresh.url)
        c.handshake()
        report = status(c)
        c.close()
        assert report["worker"] == 0 and report["validation_ids_count"] == 16, report


def test_sigterm_to_worker_0_stops_every_process_of_the_server(tmp_path):
    server = ServerProcess(["workers=3", f"hydra.run.dir={tmp_path}"]).start()
    family = psutil.Process(server.proc.pid).children(recursive=True)
    assert len(workers_of(server)) == 2
    c = Client(server.url)
    c.handshake({"seed": 0})
    assert server.stop() == 0, "".join(server.tail)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == [], alive


def test_the_workers_end_with_worker_0_even_when_it_is_killed(tmp_path):
    with ServerProcess(["workers=2", f"hydra.run.dir={tmp_path}"]) as server:
        (worker,) = workers_of(server)
        server.proc.send_signal(signal.SIGKILL)  # no chance to stop them: the kernel tells them
        assert server.proc.wait(10) == -signal.SIGKILL
        worker.wait(10)
        assert not worker.is_running()


def test_a_killed_worker_is_started_again_and_serves_on_the_port(tmp_path):
    with ServerProcess(["workers=2", f"hydra.run.dir={tmp_path}"]) as server:
        (worker,) = workers_of(server)
        worker.send_signal(signal.SIGKILL)
        wait_until(lambda: "worker 1 is back" in "".join(server.tail), "the restart")
        assert server.proc.poll() is None
        assert "worker 1 (pid" in "".join(server.tail) and "killed by SIGKILL" in "".join(
            server.tail
        )
        (again,) = workers_of(server)
        assert again.pid != worker.pid
        seen = set()
        for _ in range(CONNECTIONS):
            c = Client(server.url)
            c.handshake({"seed": 0})
            seen.add(status(c)["worker"])
            assert len(ids(c.data(4))) == 4
            c.close()
        assert seen == {0, 1}


def test_a_worker_dying_again_and_again_ends_the_server_and_supervise_restarts_it(tmp_path):
    server = ServerProcess(["workers=2", f"hydra.run.dir={tmp_path}"]).start()
    gave_up: list[str] = []
    server.supervise(gave_up.append)
    first, port = server.proc, server.port
    try:
        for death in range(1, 5):  # the 4th within a minute is one too many
            (worker,) = workers_of(server)
            worker.send_signal(signal.SIGKILL)
            if death < 4:
                text = "worker 1 is back"
                wait_until(lambda t=text, d=death: "".join(server.tail).count(t) == d, text)
        assert first.wait(30) == 2, "".join(server.tail)
        assert "the 4th worker death within a minute: stopping the server" in "".join(server.tail)
        wait_until(lambda: server.restarts == 1, "the supervisor's restart", timeout=60)
        assert server.port == port and not gave_up
        c = Client(server.url)
        c.handshake({"seed": 0})
        assert status(c)["workers"] == 2 and len(ids(c.data(3))) == 3
        c.close()
    finally:
        server.stop()


def _serve(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgpt.server", *overrides],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workers_0_is_refused_in_one_line(tmp_path):
    done = _serve("workers=0", "port=0", f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0
    said = [line for line in (done.stdout + done.stderr).splitlines() if "workers" in line]
    assert len(said) == 1 and said[0].endswith("workers must be a positive integer, got 0"), said


def test_a_port_held_by_another_server_of_several_workers_is_refused(two, tmp_path):
    # Every socket of the server sets SO_REUSEPORT: without a check first, a second server of the
    # same user would bind the port too and answer some of the connections.
    done = _serve("workers=2", f"port={two.port}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{two.port} (Address already in use)" in done.stdout


def test_token_consumers_on_either_worker_after_one_upload_get_one_processs_frames(
    tmp_path, shakespeare
):
    """Tokens on the wire over several processes: the tokenizer uploaded to one worker is found
    by the other in the shared token cache folder (no second upload), the entry is built once,
    and every frame is the bytes a one-process server without a cache sends."""
    tokenizer = small_bpe(shakespeare)
    cache = tmp_path / "tokens"
    with (
        ServerProcess(
            ["workers=2", f"tokens.cache_dir={cache}", f"hydra.run.dir={tmp_path}"]
        ) as two,
        ServerProcess(["tokens.cache=false", f"hydra.run.dir={tmp_path / 'one'}"]) as one,
    ):
        for server in (two, one):
            uploader = Client(server.url)
            uploader.handshake()
            put = {"type": "putTokenizer", "payload": {"sha256": sha(tokenizer)}}
            put["payload"]["tokenizer_json"] = tokenizer
            assert uploader.ask(put)["type"] == "tokenizerConfirmation"
            uploader.close()
        seen = Counter()
        tokens = {"tokenizer": sha(tokenizer), "eos_token": EOS}
        for k in range(CONNECTIONS):
            consumer = {"rank": k, "world_size": CONNECTIONS, "seed": 3, "tokens": tokens}
            here, there = Client(two.url), Client(one.url)
            try:
                here.handshake(consumer)  # an unknown_tokenizer error fails here
                there.handshake(consumer)
                seen[status(here)["worker"]] += 1
                got, expected = frames(here, 3, 7), frames(there, 3, 7)
                assert all(isinstance(f, bytes) for f in got), "token frames"
                assert got == expected, f"consumer {k}"
            finally:
                here.close()
                there.close()
        assert set(seen) == {0, 1}, seen
        wait_until(lambda: list(cache.rglob("meta.json")), "the token cache's entry")
        time.sleep(1.5)  # a second build, if the lock failed, would have written by now
        assert len(list(cache.rglob("meta.json"))) == 1
