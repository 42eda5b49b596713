"""Tokens on the wire in the tests: a small tokenizer trained on the corpus, and a token-mode
consumer that checks every frame it reads against the stream worked out here."""

from __future__ import annotations

import hashlib

import orjson
from tokenizers import Tokenizer

from streamgpt.data.client import Connection
from streamgpt.data.packing import Encoder
from streamgpt.data.tokens_on_wire import WireTokens
from streamgpt.server.streams import ConsumerSpec, open_stream

EOS = "<|endoftext|>"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def small_bpe(corpus, vocab_size: int = 512) -> str:
    """A BPE trained on the corpus's first samples, as a run's tokenizer.json text."""
    from streamgpt.data.tokenizer import train_bpe

    payloads, _ = open_stream(corpus, ConsumerSpec(seed=0, index=0, count=1)).payloads(
        60, frozenset()
    )
    texts = [orjson.loads(p)["inputs"]["text_output"] for p in payloads]
    return train_bpe(texts, vocab_size, 2, EOS, "<|pad|>").to_str()


class TokenReader:
    """A token-mode consumer on the real client (uploading its tokenizer if need be); `check`
    reads a frame and compares it with the samples and tokens worked out from the corpus."""

    def __init__(self, url: str, corpus, tokenizer_json: str, consumer: dict) -> None:
        workers = consumer.get("num_workers", 1)
        spec = ConsumerSpec(
            seed=consumer["seed"],
            index=consumer["rank"] * workers + consumer.get("worker", 0),
            count=consumer["world_size"] * workers,
        )
        self.expected = open_stream(corpus, spec)
        self.encode = Encoder(Tokenizer.from_str(tokenizer_json), corpus.chunking.eot_marker, EOS)
        self.conn = WireTokens(tokenizer_json, EOS).open(Connection(url, recv_timeout=10), consumer)
        assert self.conn.tokens, "the server sends tokens"
        self.frames = 0

    def check(self, batch_size: int) -> None:
        self.conn.request(batch_size)
        got = self.conn.receive_data()
        chunks = self.expected.take(batch_size)
        texts = [orjson.loads(c.payload)["inputs"]["text_output"] for c in chunks]
        assert got.ids == [c.sample_id for c in chunks], "the token reader's samples"
        assert [t.tolist() for t in got.tokens] == self.encode(texts), "the token reader's tokens"
        assert got.cursor == self.expected.cursor()
        self.frames += 1

    def close(self) -> None:
        self.conn.close()
