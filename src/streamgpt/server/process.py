"""The stream server as a child process: started, awaited until it accepts, and always stopped.

Used wherever a real server must run beside something else (training with the embedded server,
the tests, the benchmarks). The child gets a free loopback port (`port=0`), is watched for its
readiness line, and is tied to this process: it is stopped on exit, on an error, and (on Linux)
killed by the kernel if this process dies without cleaning up.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SERVE_SCRIPT = REPO / "scripts" / "serve.py"
_READY = re.compile(r"stream server listening on (ws://\S+)")


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
        self._ready = threading.Event()

    def start(self) -> ServerProcess:
        """Launch the server and wait until it accepts connections."""
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Launch the server without waiting for it (wait_ready() does)."""
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(self.env or {})},
            preexec_fn=_die_with_parent,
        )
        atexit.register(self.stop)
        threading.Thread(target=self._read_output, daemon=True).start()
        return self

    def wait_ready(self) -> ServerProcess:
        if not self._ready.wait(self.startup_timeout) or self.url is None:
            self.stop()
            raise RuntimeError(
                f"the stream server did not start ({' '.join(self.command[1:])}):\n"
                + "".join(self.tail)
            )
        return self

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(SERVE_SCRIPT), *self.overrides]

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sink = self.log_file.open("a") if self.log_file else None
        try:
            for line in self.proc.stdout:
                self.tail.append(line)
                if sink:
                    sink.write(line)
                    sink.flush()
                if self.url is None and (match := _READY.search(line)):
                    self.url = match.group(1)
                    self._ready.set()
        finally:
            if sink:
                sink.close()
            self._ready.set()  # the process ended: wake start() so it can report why

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` s. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        atexit.unregister(self.stop)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
