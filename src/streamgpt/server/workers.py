"""A server of several processes on one port (`workers: N`, Linux): all the cores of a data host.

Worker 0 is the process that was started. It checks that the port is free and binds it first (so
`port=0` resolves to one port), then starts workers 1 … N-1: fresh interpreters (the `spawn` start
method: safe beside threads) that each load the corpus and listen on the same host:port. Every
listening socket sets SO_REUSEPORT, and the kernel deals each new connection to one of them by a
hash of its addresses. Any worker can serve any consumer, since a consumer's stream is a function
of (corpus, seed, consumer, cursor): one that reconnects, most likely to another worker, continues
from its cursor. Core-protocol sessions share one stream kept by worker 0; the other workers relay
them there (relay.py).

The readiness line is printed once every worker listens. The workers die with worker 0
(PR_SET_PDEATHSIG) and stop when it stops. A worker that dies is started again: its consumers
reconnect and continue, and the rest of the server (the shared stream above all) is untouched.
Restarting the whole server instead would rewind the shared stream under every EIR client. More
than MAX_DEATHS deaths within a minute end the server with an error, for a supervisor
(ServerProcess.supervise) to start it afresh or give up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from omegaconf import OmegaConf

from streamgpt.server import relay
from streamgpt.server.app import StreamServer
from streamgpt.server.process import _die_with_parent

log = logging.getLogger("streamgpt.server")

MAX_DEATHS = 3  # worker deaths within a minute that a server survives
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's, for the workers


class Tagged(logging.Filter):
    """Prefixes the server's log lines with the worker that wrote them."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.tag = f"worker {worker}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.msg.startswith(self.tag):
            record.msg = self.tag + record.msg
        return True


def bind_first(host: str, port: int) -> int:
    """The port worker 0 will listen on (`port=0`: a free one), refused if anyone holds it.

    SO_REUSEPORT would otherwise let a second server of the same user share the port without a
    word, each answering some of the connections: a plain bind finds that out first."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's listener
        probe.bind(address)
        return probe.getsockname()[1]


def _recv_and_close(ready: Connection) -> None:
    # Closed by the thread that reads it: a stop that cancels the wait cannot close it under it.
    with ready:
        ready.recv()


def _why(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Team:
    """Worker 0's side: the other workers, started, watched, started again, stopped."""

    def __init__(self, cfg: Any, server: StreamServer) -> None:
        self.server = server
        self.size = cfg.workers
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.secret = secrets.token_urlsafe(32)
        self.procs: dict[int, BaseProcess] = {}
        self._spawn = multiprocessing.get_context("spawn")
        self._deaths: collections.deque[float] = collections.deque()
        self._failed: asyncio.Future[str] | None = None
        self._restarts: set[asyncio.Task] = set()
        self._stopping = False
        root = logging.getLogger()
        files = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]
        self._logging = {"level": root.level, "files": files}

    def bind(self) -> None:
        """Before worker 0 listens: its port, and SO_REUSEPORT on its sockets."""
        self.server.port = bind_first(self.server.host, self.server.port)
        self.server.reuse_port = True
        self.server.workers = self.size
        logging.getLogger("streamgpt.server").addFilter(Tagged(0))

    async def start(self) -> None:
        """Worker 0's private port, then the other workers; returns once all of them listen."""
        self.server.relayed = await relay.listen(self.server, self.secret)
        self._failed = asyncio.get_running_loop().create_future()
        await asyncio.gather(*(self._start(k) for k in range(1, self.size)))

    async def _start(self, k: int) -> None:
        config = {**self.config, "port": self.server.port}
        url = relay.private_url(self.server.relayed, self.server.path)
        ready, told = self._spawn.Pipe(duplex=False)
        # Started from this thread, the loop's: the parent-death signal follows the thread.
        proc = self._spawn.Process(
            target=serve_as_worker,
            args=(config, k, url, self.secret, os.getpid(), told, self._logging),
            name=f"streamgpt-server-worker-{k}",
            daemon=True,
        )
        proc.start()
        told.close()
        self.procs[k] = proc
        try:
            await asyncio.to_thread(_recv_and_close, ready)
        except EOFError:  # it ended before it listened
            proc.join()
            raise RuntimeError(
                f"worker {k} of the stream server ended ({_why(proc.exitcode)}) before it "
                "listened; its log lines above say why"
            ) from None
        asyncio.get_running_loop().add_reader(proc.sentinel, self._died, k, proc)

    def _died(self, k: int, proc: BaseProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        if not self._stopping:
            task = asyncio.create_task(self._restart(k, proc))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    async def _restart(self, k: int, proc: BaseProcess) -> None:
        proc.join()
        now = time.monotonic()
        self._deaths.append(now)
        while now - self._deaths[0] > 60:
            self._deaths.popleft()
        why = f"worker {k} (pid {proc.pid}) died ({_why(proc.exitcode)})"
        if len(self._deaths) > MAX_DEATHS:
            self._fail(f"{why}, the {len(self._deaths)}th worker death within a minute")
            return
        log.warning("%s; starting it again", why)
        try:
            await self._start(k)
        except RuntimeError as e:
            self._fail(str(e))
            return
        log.info("worker %d is back (pid %d)", k, self.procs[k].pid)

    def _fail(self, why: str) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(why)

    async def watch(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; a RuntimeError saying why when the server cannot go on."""
        assert self._failed is not None
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopped, self._failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if self._failed.done():
            raise RuntimeError(f"{self._failed.result()}: stopping the server")

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every worker (each closes its connections), SIGKILL after `timeout` s."""
        self._stopping = True
        for task in self._restarts:
            task.cancel()
        procs = [p for p in self.procs.values() if p.is_alive()]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            await asyncio.to_thread(proc.join, max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.server.relayed is not None:
            self.server.relayed.close()
            await self.server.relayed.wait_closed()


# -- a worker other than 0 ----------------------------------------------------------------------


def serve_as_worker(
    config: dict,
    k: int,
    url: str,
    secret: str,
    parent: int,
    told: Connection,
    logging_setup: dict,
) -> None:
    """Worker k's process: the same server as worker 0's, on its port; core sessions relayed."""
    # Ctrl-C in a terminal reaches every process of the group: worker 0 alone decides to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent:  # worker 0 died before this process was tied to it
        return
    root = logging.getLogger()
    root.setLevel(logging_setup["level"])
    handlers = [logging.StreamHandler(sys.stdout)]
    handlers += [logging.FileHandler(path) for path in logging_setup["files"]]  # appends
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    log.addFilter(Tagged(k))
    from streamgpt.server import build_server, quiet_and_lean  # import cycle: that one uses this

    quiet_and_lean()
    try:
        server = build_server(OmegaConf.create(config))
    except (ValueError, RuntimeError, OSError) as e:
        log.error("error: %s", e)
        sys.exit(2)
    server.reuse_port, server.workers, server.worker = True, config["workers"], k
    server.relay = relay.Relay(url, secret, k)
    asyncio.run(_serve(server, told))


async def _serve(server: StreamServer, told: Connection) -> None:
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    told.send(os.getpid())
    told.close()
    await stop.wait()
    await server.stop()
