"""The stream server: sources -> corpus -> per-consumer streams -> protocol 1.0 over WebSockets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from streamgpt.cache import cache_dir
from streamgpt.malloc import keep_freed_memory
from streamgpt.server.app import StreamServer
from streamgpt.server.config import LimitsConfig, validate
from streamgpt.server.corpus import Chunking
from streamgpt.server.sources import build_corpus
from streamgpt.server.token_cache import TokenCache
from streamgpt.server.workers import Team

log = logging.getLogger("streamgpt.server")

__all__ = ["StreamServer", "build_server", "run"]


def build_server(cfg: Any) -> StreamServer:
    """A StreamServer from a composed `serve` config (the corpus is loaded, not yet listening)."""
    validate(cfg)
    chunking = Chunking(
        words=cfg.chunk.words, eot_marker=cfg.chunk.eot_marker, whitespace=cfg.chunk.whitespace
    )
    corpus = build_corpus(cfg.source, chunking, cfg.output_name)
    token = os.environ.get(cfg.auth.token_env) if cfg.auth.token_env else None
    tokens = cfg.tokens
    folder = Path(tokens.cache_dir).expanduser() if tokens.cache_dir else cache_dir() / "tokens"
    token_cache = TokenCache(folder.absolute(), tokens.cache_max_bytes) if tokens.cache else None
    return StreamServer(
        corpus,
        host=cfg.host,
        port=cfg.port,
        path=cfg.path,
        seed=cfg.seed,
        output_name=cfg.output_name,
        max_epochs=cfg.end.max_epochs,
        max_samples=cfg.end.max_samples,
        limits=LimitsConfig(**cfg.limits),
        token=token,
        origins=list(cfg.auth.origins) if cfg.auth.origins is not None else None,
        compression=cfg.compression,
        log_every_s=cfg.log_every_s,
        token_cache=token_cache,
    )


def quiet_and_lean() -> None:
    """Process-wide settings of a server process."""
    keep_freed_memory(mmap_threshold=64 << 20, trim_threshold=256 << 20)  # reply buffers
    # Our own lines say who connected and what they read; websockets' would repeat them.
    logging.getLogger("websockets").setLevel(logging.WARNING)


def run(cfg: Any) -> None:
    """Serve until SIGINT or SIGTERM. Prints the URL once it accepts connections."""
    quiet_and_lean()
    server = build_server(cfg)
    team = Team(cfg, server) if cfg.workers > 1 else None  # the other server processes
    description = server.corpus.description

    async def main() -> None:
        try:
            if team is not None:
                team.bind()
            await server.start()
        except OSError as e:
            raise OSError(
                f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); is another server "
                "running there? Choose another port with port=... (port=0 picks a free one)"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if team is not None:
                await team.start()
            log.info(
                "serving %s: %s documents (%s train, %s validation), %d-word chunks%s%s",
                description["source"],
                description.get("documents", "?"),
                description.get("train_documents", "?"),
                description.get("validation_documents", "?"),
                server.corpus.chunking.words,
                f", {server.workers} processes" if team is not None else "",
                ", bearer token required" if server.token else "",
            )
            # The readiness line: the embedded-server launcher and the tests wait for it.
            print(f"streamgpt stream server listening on {server.url}", flush=True)
            await (team.watch(stop) if team is not None else stop.wait())
            log.info("shutting down")
        finally:
            if team is not None:
                await team.stop()
            await server.stop()

    asyncio.run(main())
