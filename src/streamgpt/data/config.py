"""Typed schemas of the `data/stream` and `tokenizer` config groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RetryConfig:
    # After losing the server mid-run, keep reconnecting (from the last cursor) this long.
    budget_s: float = 120.0
    backoff_s: float = 0.5  # first wait; doubles up to max_backoff_s
    max_backoff_s: float = 8.0


@dataclass
class ElasticConfig:
    # > 0: the data is cut into streams x phases canonical streams (data/elastic.py), so the
    # batches of every step are the same whatever the ranks, workers and accumulation.
    streams: int = 0
    phases: int = 1


@dataclass
class StreamConfig:
    # One url, or a list: consumer k reads from url[k % len(url)] (server replicas).
    # null: start the embedded server (train.py does this).
    url: Any = "ws://127.0.0.1:8000/ws"
    batch_size: int = 32  # sequences per device per step
    max_length: int = 128  # context length in tokens
    valid_size: int = 128  # validation samples read once from the server's validation split
    streaming_setup_samples: int = 2000  # samples the BPE tokenizer is trained on
    seed: int = 0  # order of the stream: same seed, same batches
    num_workers: int = 0  # DataLoader workers per rank; each is one consumer
    prefetch_batches: int = 4  # ready batches kept ahead of the training step, per consumer
    samples_per_request: int = 32
    requests_in_flight: int = 2
    connect_timeout_s: float = 10.0
    # A reply slower than this counts as a stalled server: reconnect and continue.
    recv_timeout_s: float = 60.0
    retry: RetryConfig = field(default_factory=RetryConfig)
    # Environment variable holding the server's bearer token (the token never enters a config).
    token_env: str | None = "STREAMGPT_TOKEN"
    # Write <run>/batches-rank<r>.jsonl: per trained batch, its consumer, sample ids and a hash of
    # its tokens (data provenance; two runs trained on the same data have the same lines).
    log_batches: bool = False
    # > 0: train on the first this many batches of the stream, over and over (debug=overfit).
    overfit_batches: int = 0
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    # Ask the server for token ids instead of text (it tokenizes with the run's tokenizer, which
    # the client uploads); the batches are the same. Falls back to text on a server without it.
    tokens_on_wire: bool = False


@dataclass
class TokenizerConfig:
    # bpe: a byte-level BPE trained on the first streamed samples; bytes: the 256 bytes, nothing
    # trained (vocab_size unused); pretrained: a tokenizer.json.
    name: str = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    path: str | None = None
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
