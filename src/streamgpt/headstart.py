"""The run's setup, done once and while Lightning imports: the checkpoint to resume, the stream
servers, the tokenizer and the validation samples. `HeadStart.inputs()` hands them to the
training code (run.py), which passes each part to what needs it.

Importing Lightning takes ~5 s of one core (it pulls in torchmetrics, scipy and torch._dynamo),
time in which the other cores idle. `train.py` opens a HeadStart first: the embedded server starts
in its own process, the checkpoint to resume is chosen, and a background thread checks the
servers and (global rank 0) reads the validation samples and trains the BPE tokenizer (in Rust,
outside the GIL) into the run folder, unless it has them; the other ranks wait for those files.
Nothing here imports Lightning.

With several processes per node (DDP), the node's local rank 0 starts the embedded server and
writes its URL to <run>/server/url-<host>; the node's other ranks read it there.

The embedded server is supervised: if it dies, it is started again on the same port and the
consumers continue from their cursors. If it cannot be started again, the run ends with an error
that says why (raised in the main thread, wherever training is).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from streamgpt.budget import check_resume
from streamgpt.checkpoints import adopt_run_files, find_checkpoint
from streamgpt.data.client import Connection, StreamError, token_from_env
from streamgpt.data.stream_setup import StreamSetup
from streamgpt.perf import STARTUP
from streamgpt.server.process import ServerProcess

log = logging.getLogger("streamgpt")


def local_rank() -> int:
    """This process's rank on its node, under torchrun / Lightning (LOCAL_RANK) or srun."""
    return int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)


def global_rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def launch_embedded_server(cfg: DictConfig, run_dir: Path) -> ServerProcess:
    """The embedded server (cfg.server) on a free port, launched; `wait_ready()` awaits it."""
    folder = run_dir / "server"
    folder.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg.server, resolve=True)
    config["port"] = 0
    config["defaults"] = ["serve_schema", "_self_"]
    config["hydra"] = {"run": {"dir": str(folder)}, "job": {"name": "serve"}}
    (folder / "embedded.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    return ServerProcess(
        [f"--config-dir={folder}", "--config-name=embedded"], log_file=folder / "stdout.log"
    ).launch()


@dataclass
class RunInputs:
    """What the run's setup hands to the training code."""

    stream: DictConfig  # data.stream, with the servers' URLs
    setup: StreamSetup  # the servers checked; tokenizer.json and validation.jsonl in the run folder
    checkpoint: str | None  # the checkpoint to resume, None for a fresh start


def wait_for_url(path: Path, token: str | None, timeout: float = 600.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            url = path.read_text().strip()
            try:
                Connection(url, token=token, connect_timeout=2).open().close()
                return url
            except (OSError, TimeoutError, ConnectionError):
                pass  # a stale file from an earlier run, or the server is still starting
        time.sleep(0.5)
    raise RuntimeError(
        f"local rank {local_rank()} found no embedded stream server (waited {timeout:g} s for "
        f"{path}); every rank of a node must share the run folder (set hydra.run.dir), or point "
        "all ranks at running servers with data.stream.url"
    )


# Sent to the main thread when the embedded server cannot be restarted (interrupts a data wait).
SERVER_LOST = signal.SIGUSR2


class HeadStart:
    """The run's inputs, got ready in the background. A context manager: on exit the embedded
    server is stopped. Errors in the background are raised by `inputs()`.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.paths.output_dir)
        self.server: ServerProcess | None = None
        self.url_file = self.run_dir / "server" / f"url-{socket.gethostname()}"
        self.checkpoint: str | None = None  # chosen on entry
        self._inputs: RunInputs | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="head-start", daemon=True)
        self._lost: StreamError | None = None  # the embedded server died for good
        self._previous_handler: Any = None

    def __enter__(self) -> HeadStart:
        self._start = time.monotonic()
        if not self.cfg.data.stream.url and local_rank() == 0:
            self.url_file.unlink(missing_ok=True)
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(SERVER_LOST, self._raise_lost)
            self.server = launch_embedded_server(self.cfg, self.run_dir)
        try:  # while the server starts: the checkpoint, whose run's tokenizer a resume keeps
            self.checkpoint = find_checkpoint(self.cfg.ckpt_path, self.cfg.resume, self.run_dir)
            check_resume(self.cfg.trainer.budget_s, self.checkpoint)  # resume=auto found one
            if self.checkpoint is not None:
                adopt_run_files(self.checkpoint, self.run_dir)
        except BaseException:
            self.__exit__()  # a `with` whose entry fails never exits: stop the server here
            raise
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            code = self.server.stop()
            self.url_file.unlink(missing_ok=True)
            log.info("embedded stream server stopped (exit code %s)", code)
        if self._previous_handler is not None:
            signal.signal(SERVER_LOST, self._previous_handler)
        if self._thread.ident is not None:  # started
            self._thread.join(5)  # with the server gone, a thread still reading fails fast

    def _server_lost(self, why: str) -> None:
        """The supervisor gave up: end the run from its main thread, with the reason."""
        self._lost = StreamError(
            f"the embedded stream server died and could not be started again: {why}. Its log: "
            f"{self.run_dir / 'server' / 'serve.log'}; the run can continue from its last "
            "checkpoint with resume=auto"
        )
        if self._previous_handler is not None:
            signal.pthread_kill(threading.main_thread().ident, SERVER_LOST)
        else:  # no handler to end the run: the consumers' retry budget will
            log.error("%s", self._lost)

    def _raise_lost(self, signum: int, frame: FrameType | None) -> None:
        if self._lost is not None:
            raise self._lost

    def _run(self) -> None:
        try:
            stream = OmegaConf.merge(self.cfg.data.stream, {"url": self._find_servers()})
            STARTUP.ready("stream server")
            setup = StreamSetup(stream, self.cfg.tokenizer, self.run_dir)
            setup.check_servers()
            if global_rank() == 0 and local_rank() == 0:
                setup.prepare()
            else:
                self._wait_for_rank_zero(setup)
            STARTUP.ready("tokenizer and validation samples")
            self._inputs = RunInputs(stream, setup, self.checkpoint)
        except BaseException as e:  # raised again in the main thread, by inputs()
            self._error = e

    def _wait_for_rank_zero(self, setup: StreamSetup, timeout: float = 1800.0) -> None:
        """Global rank 0 writes the tokenizer and validation samples to the shared run folder."""
        deadline = time.monotonic() + timeout
        while not setup.prepared:
            if time.monotonic() > deadline:
                raise StreamError(
                    f"rank {global_rank()} waited {timeout:g} s for rank 0's {setup.tokenizer_path}"
                    "; every rank must share the run folder (set hydra.run.dir to a shared path)"
                )
            time.sleep(0.5)

    def _find_servers(self) -> list[str]:
        url: Any = self.cfg.data.stream.url
        if url:
            return [url] if isinstance(url, str) else [str(u) for u in url]
        if self.server is None:  # another rank of this node starts it
            return [wait_for_url(self.url_file, token_from_env(self.cfg.data.stream.token_env))]
        self.server.wait_ready()
        self.server.supervise(self._server_lost)
        self.url_file.write_text(self.server.url)
        log.info(
            "embedded stream server (%s) at %s, ready in %.1f s; its log: %s",
            self.cfg.server.source.name,
            self.server.url,
            time.monotonic() - self._start,
            self.run_dir / "server" / "serve.log",
        )
        return [self.server.url]

    def inputs(self) -> RunInputs:
        """The run's inputs, once the background work is done; raises its error, if it had one."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._inputs is not None
        return self._inputs

    def server_pid(self) -> int | None:
        """The embedded server's current process (the supervisor may have replaced it)."""
        proc = self.server.proc if self.server is not None else None
        return proc.pid if proc is not None else None
