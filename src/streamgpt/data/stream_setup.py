"""StreamSetup: what a run reads from its stream servers once, before training.

- check_servers: every url answers, and all replicas serve the same corpus the same way.
- prepare: <run>/validation.jsonl (from the server's validation split) and <run>/tokenizer.json
  (a BPE trained on the first streamed samples, or a given file), unless the run folder has them.

Kept free of Lightning: `train.py` runs it in a background thread while Lightning imports
(headstart.HeadStart) and hands it to StreamDataModule; a StreamDataModule used on its own makes
its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
from tokenizers import Tokenizer

from streamgpt.atomic import write_atomic
from streamgpt.data import tokenizer as tokenizers
from streamgpt.data.client import Connection, ServerRefused, StreamError, no_server, token_from_env

log = logging.getLogger("streamgpt.data")


class StreamSetup:
    """A run's stream servers, and what is read from them once, before training."""

    def __init__(self, stream: Any, tokenizer: Any, run_dir: str | Path) -> None:
        self.cfg = stream
        self.tok_cfg = tokenizer
        self.run_dir = Path(run_dir)
        self.urls = [stream.url] if isinstance(stream.url, str) else [str(u) for u in stream.url]
        self.token = token_from_env(stream.token_env)
        self.server: dict[str, Any] = {}
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.run_dir / "tokenizer.json"

    @property
    def validation_path(self) -> Path:
        return self.run_dir / "validation.jsonl"

    @property
    def prepared(self) -> bool:
        return self.tokenizer_path.exists() and (
            self.cfg.valid_size <= 0 or self.validation_path.exists()
        )

    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (prepare() made it), read once."""
        if self._tokenizer is None:
            self._tokenizer = tokenizers.load(self.tokenizer_path, self.tok_cfg.eos_token)
        return self._tokenizer

    def open(self, url: str, consumer: dict[str, Any] | None = None) -> Connection:
        conn = Connection(
            url,
            token=self.token,
            connect_timeout=self.cfg.connect_timeout_s,
            recv_timeout=self.cfg.recv_timeout_s,
        )
        try:
            return conn.open(consumer)
        except ServerRefused:
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            raise StreamError(no_server(url, e)) from None

    def servers(self) -> dict[str, Any]:
        """What the servers serve (see check_servers), asked once."""
        return self.server or self.check_servers()

    def check_servers(self) -> dict[str, Any]:
        """Status of every server; all replicas must serve the same corpus the same way."""
        statuses = []
        for url in self.urls:
            conn = self.open(url)
            try:
                statuses.append((url, conn.extended, conn.status()))
            finally:
                conn.close()
        url0, extended, status0 = statuses[0]
        corpus0 = status0.get("corpus") or {}
        for url, ext, status in statuses[1:]:
            corpus = status.get("corpus") or {}
            if ext != extended or corpus.get("fingerprint") != corpus0.get("fingerprint"):
                raise StreamError(
                    f"the servers disagree: {url0} serves corpus {corpus0.get('fingerprint')} "
                    f"but {url} serves {corpus.get('fingerprint')}; every url in data.stream.url "
                    "must be a replica of the same corpus, chunking and version"
                )
        end = status0.get("end") or {}
        self.server = {
            "extended": extended,
            # Ours reports its end; a core-only server may end whenever it likes.
            "finite": not extended or any(v is not None for v in end.values()),
            "eot_marker": corpus0.get("eot_marker", self.tok_cfg.eos_token),
            "corpus": corpus0,
            # A mixture's stages from a training step: where each starts (consumer.StepStages).
            "step_stages": [s["from_step"] for s in corpus0.get("stages", []) if "from_step" in s],
            # A mixture's component names (sample ids are <component>/<id>); [] for one source.
            "components": list((status0.get("mixture") or {}).get("components") or []),
        }
        if not extended:
            log.warning(
                "%s speaks only the core protocol (no extensions): training will work, but the "
                "stream is shared and timing-dependent, so runs are not deterministic and resume "
                "is not exact",
                url0,
            )
        return self.server

    def read(
        self, consumer: dict[str, Any] | None, n: int, stop_at_epoch_end: bool
    ) -> list[tuple[str, str]]:
        """Up to n (id, text) samples of one stream, read once at setup."""
        conn = self.open(self.urls[0], consumer)
        out: list[tuple[str, str]] = []
        try:
            while len(out) < n:
                conn.request(min(self.cfg.samples_per_request, n - len(out)))
                reply = conn.receive_data()
                out += zip(reply.ids, reply.texts, strict=True)
                if reply.ended or (
                    stop_at_epoch_end and reply.cursor and reply.cursor.get("epoch", 0) > 0
                ):
                    break
        except (OSError, TimeoutError, ConnectionError) as e:
            raise StreamError(
                f"lost the stream server at {self.urls[0]} during setup: {e}"
            ) from None
        finally:
            conn.close()
        return out

    def prepare(self) -> None:
        """The run's tokenizer and validation samples, unless the run folder has them."""
        extended = self.servers()["extended"]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.validation_path.exists() and self.cfg.valid_size > 0:
            if extended:
                split = {"rank": 0, "world_size": 1, "seed": 0, "split": "validation"}
                samples = self.read(split, self.cfg.valid_size, stop_at_epoch_end=False)
            else:  # EIR's way: hold out the first samples of the shared stream, tell the server
                samples = self.read(None, self.cfg.valid_size, stop_at_epoch_end=False)
                conn = self.open(self.urls[0])
                try:
                    conn.set_validation_ids([i for i, _ in samples])
                finally:
                    conn.close()
            if not samples:
                raise StreamError(
                    f"the server's validation split is empty ({self.urls[0]}): hold out documents "
                    "on the server (source.validation_docs=N), or train without validation with "
                    "data.stream.valid_size=0"
                )
            if len(samples) < self.cfg.valid_size:
                log.warning(
                    "the validation split has %d samples, fewer than data.stream.valid_size=%d; "
                    "using all of them",
                    len(samples),
                    self.cfg.valid_size,
                )
            lines = [orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in samples]
            write_atomic(self.validation_path, b"".join(lines))

        def setup_texts() -> list[str]:
            consumer = {"rank": 0, "world_size": 1, "seed": self.cfg.seed, "split": "train"}
            samples = self.read(
                consumer if extended else None,
                self.cfg.streaming_setup_samples,
                stop_at_epoch_end=True,
            )
            log.info("training the tokenizer on %d streamed samples", len(samples))
            return [t for _, t in samples]

        tokenizers.build(self.tok_cfg, self.run_dir, setup_texts)
