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
    core = server._core.cursor()
    # A mixture's composition: the shared stream's stage and weights, samples per component.
    mixture = isinstance(server.corpus, MixCorpus)
    extra = {"mixture": server.corpus.composition(server._core)} if mixture else {}
    limits = server.limits
    return {
        "server": f"streamgpt {__version__}",
        "protocol": PROTOCOL_VERSION,
        "extensions": list(EXTENSIONS),
        "active_connections": len(server._connections),
        "current_position": core["n"],
        "shared_cursor": core,
        "ended": server._core_ended,
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
