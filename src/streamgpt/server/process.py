"""The stream server as a child process: started, awaited until it accepts, and always stopped.

Used wherever a real server must run beside something else (training with the embedded server,
the tests, the benchmarks). The child gets a free loopback port (`port=0`), is watched for its
readiness line, and is tied to this process: it is stopped on exit, on an error, and (on Linux)
killed by the kernel if this process dies without cleaning up. It runs in its own session, so a
Ctrl-C in the terminal reaches the trainer (which stops after its step) and not the server.

`supervise()` restarts it, on the same port, whenever it dies: consumers reconnect to the same
URL and continue from their cursors, so the batches are those of an undisturbed run.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("streamgpt")

_READY = re.compile(r"stream server listening on (ws://\S+)")
_LOG_PREFIX = re.compile(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ")  # Hydra's log format


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    def __init__(
        self,
        overrides: list[str] | tuple[str, ...] = (),
        *,
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        startup_timeout: float = 300.0,
    ) -> None:
        self.overrides = ["port=0", *overrides]
        self.env = env
        self.log_file = log_file
        self.startup_timeout = startup_timeout
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.restarts = 0
        self._ready = threading.Event()  # this launch printed its URL, or ended
        self._listening = False  # ... and it was the URL
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # self.proc is replaced by the supervisor, read by stop()
        self._supervisor: threading.Thread | None = None

    def start(self) -> ServerProcess:
        """Launch the server and wait until it accepts connections."""
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Launch the server without waiting for it (wait_ready() does)."""
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the stream server is being stopped")
            ready = self._ready = threading.Event()
            self._listening = False
            self.proc = proc = subprocess.Popen(
                self.command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **(self.env or {})},
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        atexit.register(self.stop)
        threading.Thread(target=self._read_output, args=(proc, ready), daemon=True).start()
        return self

    def wait_ready(self) -> ServerProcess:
        proc, ready = self.proc, self._ready
        if not ready.wait(self.startup_timeout) or not self._listening:
            self._end(proc)
            raise RuntimeError(
                f"the stream server did not start ({' '.join(self.command[1:])}):\n"
                + "".join(self.tail)
            )
        return self

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "streamgpt.server", *self.overrides]

    @property
    def port(self) -> int | None:
        match = re.search(r":(\d+)/", self.url or "")
        return int(match.group(1)) if match else None

    def _read_output(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        assert proc.stdout is not None
        sink = self.log_file.open("a") if self.log_file else None
        try:
            for line in proc.stdout:
                self.tail.append(line)
                if sink:
                    sink.write(line)
                    sink.flush()
                if not ready.is_set() and (match := _READY.search(line)):
                    self.url = match.group(1)
                    self._listening = True
                    ready.set()
        finally:
            if sink:
                sink.close()
            ready.set()  # the process ended: wake wait_ready() so it can report why

    # -- supervision --------------------------------------------------------------------------

    def supervise(
        self,
        on_give_up: Callable[[str], None],
        *,
        max_failed_starts: int = 3,
        max_deaths_per_minute: int = 10,
    ) -> None:
        """Restart the server on the same port whenever it exits before stop().

        Gives up, calling `on_give_up(why)`, when `max_failed_starts` restarts in a row fail (the
        port was taken, the corpus is gone...) or when it dies more than `max_deaths_per_minute`.
        """
        # The kernel's parent-death signal follows the thread that started a child: restarted
        # servers belong to this long-lived thread, which ends only after stop().
        self._supervisor = threading.Thread(
            target=self._supervise,
            args=(on_give_up, max_failed_starts, max_deaths_per_minute),
            name="stream-server-supervisor",
            daemon=True,
        )
        self._supervisor.start()

    def _supervise(self, on_give_up, max_failed_starts: int, max_deaths_per_minute: int) -> None:
        deaths: collections.deque[float] = collections.deque()
        self.overrides = [f"port={self.port}", *self.overrides[1:]]
        while True:
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            deaths.append(now)
            while now - deaths[0] > 60:
                deaths.popleft()
            if len(deaths) > max_deaths_per_minute:
                on_give_up(f"it died {len(deaths)} times within a minute (last exit code {code})")
                return
            log.warning(
                "the stream server exited (code %s); restarting it on port %s", code, self.port
            )
            started = time.monotonic()
            for attempt in range(1, max_failed_starts + 1):
                try:
                    self.launch().wait_ready()
                    break
                except RuntimeError as e:
                    if self._stopping.is_set():
                        return
                    if attempt == max_failed_starts:
                        said = str(e).strip().splitlines()[-1] if str(e).strip() else "nothing"
                        said = _LOG_PREFIX.sub("", said).removeprefix("error: ")
                        on_give_up(f"{max_failed_starts} restarts failed; the last said: {said}")
                        return
                    self._stopping.wait(attempt)
            self.restarts += 1
            log.info(
                "the stream server is back at %s after %.1f s (restart %d)",
                self.url,
                time.monotonic() - started,
                self.restarts,
            )

    # -- stopping -----------------------------------------------------------------------------

    def _end(self, proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` s."""
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server (and its supervision). Returns its exit code."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc is None:
            return None
        self._end(proc, timeout)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout)
        with self._lock:  # a restart that raced with stop() is ended too
            self._end(self.proc, timeout)
        atexit.unregister(self.stop)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
