"""What the server says about itself: the `status` reply's payload and the throughput log line."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from streamgpt import __version__
from streamgpt.server.mixture import MixCorpus
from streamgpt.wire import EXTENSIONS, PROTOCOL_VERSION

if TYPE_CHECKING:
    from streamgpt.server.app import StreamServer

log = logging.getLogger("streamgpt.server")


def status(server: StreamServer) -> dict[str, Any]:
    # Only worker 0 serves the shared stream (the others relay core sessions to it): elsewhere
    # its fields are null rather than those of a stream nobody reads.
    shared = server.worker == 0
    core = server._core.cursor() if shared else None
    extra: dict[str, Any] = {}
    if isinstance(server.corpus, MixCorpus):  # the shared stream's stage, samples per component
        extra["mixture"] = server.corpus.composition(server._core)
        if not shared:
            extra["mixture"].update(stage=None, from_sample=None)
            for component in extra["mixture"]["components"].values():
                component["weight"] = None
    if server.relayed is not None:
        extra["relayed_connections"] = len(server.relayed.connections)
    limits = server.limits
    return {
        "server": f"streamgpt {__version__}",
        "protocol": PROTOCOL_VERSION,
        "extensions": list(EXTENSIONS),
        "workers": server.workers,
        "worker": server.worker,
        "active_connections": len(server._connections),
        "current_position": core["n"] if shared else None,
        "shared_cursor": core,
        "ended": server._core_ended if shared else None,
        "end": {"max_epochs": server.max_epochs, "max_samples": server.max_samples},
        "validation_ids_count": len(server._validation_ids),
        "samples_served": server.samples_served,
        "bytes_served": server.bytes_served,
        "uptime_s": round(time.monotonic() - server._started, 1),
        "corpus": {
            **server.corpus.description,
            "fingerprint": server.corpus.fingerprint,
            "chunk_words": server.corpus.chunking.words,
            "whitespace": server.corpus.chunking.whitespace,
            "eot_marker": server.corpus.chunking.eot_marker,
        },
        "limits": {
            "max_frame_bytes": limits.max_frame_bytes,
            "max_batch_size": limits.max_batch_size,
            "max_connections": limits.max_connections,
            "idle_timeout_s": limits.idle_timeout_s,
            "max_validation_ids": limits.max_validation_ids,
            "max_tokenizer_bytes": limits.max_tokenizer_bytes,
        },
        "auth": "bearer" if server.token else None,
        "token_cache": server.token_cache.status(),
        **extra,
    }


async def log_throughput(server: StreamServer) -> None:
    samples, size, then = server.samples_served, server.bytes_served, time.monotonic()
    while True:
        await asyncio.sleep(server.log_every_s)
        now = time.monotonic()
        ds, db, dt = server.samples_served - samples, server.bytes_served - size, now - then
        if ds:
            log.info(
                "served %.0f samples/s, %.1f MB/s in %.0f s; %d connections; %d samples so far",
                ds / dt,
                db / dt / 1e6,
                dt,
                len(server._connections),
                server.samples_served,
            )
        samples, size, then = server.samples_served, server.bytes_served, now
