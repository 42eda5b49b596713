"""Tokens on the wire (docs/PROTOCOL.md §3.11): the server tokenizes for a consumer that asks.

A consumer names its tokenizer by the sha256 of its tokenizer.json in the handshake
(`consumer.tokens`); a server that does not hold it refuses the handshake with an
`unknown_tokenizer` error, and the client uploads it with `putTokenizer` on any connection. The
consumer's `getData` is then answered with one binary frame of token ids: the samples tokenized
exactly as the client's own Encoder (data/packing.py) would, the server's end-of-text marker
replaced by the consumer's eos token and no special tokens added, so batches are the same bits.
Tokenizing runs in a worker thread: other connections are not stalled by it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tokenizers import Tokenizer

from streamgpt.server import protocol
from streamgpt.server.protocol import ProtocolError
from streamgpt.wire import TOKEN_DTYPES, TOKEN_FRAME_MAGIC

log = logging.getLogger("streamgpt.server")

MAX_TOKENIZERS = 8  # tokenizers held at once; the least recently used is dropped
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_EOS_CHARS = 256


class BinaryFrame(bytes):
    """A reply sent as a binary WebSocket frame (every other reply is a text frame)."""


@dataclass(frozen=True)
class TokenMode:
    """How one consumer's samples become a token frame."""

    tokenizer: Tokenizer
    replace: str | None  # the server's end-of-text marker, when it is not the eos token
    eos_token: str
    dtype: str  # a key of TOKEN_DTYPES

    def frame(self, samples: list[bytes], cursor: dict[str, Any]) -> BinaryFrame:
        """The samples (at least one, as the JSON a text reply would carry) as one token frame."""
        ids, texts = [], []
        for sample in samples:
            parsed = orjson.loads(sample)
            ids.append(parsed["sample_id"])
            texts.append(next(iter(parsed["inputs"].values())))
        if self.replace:
            texts = [t.replace(self.replace, self.eos_token) for t in texts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        lengths = [len(e.ids) for e in encodings]
        little = np.dtype(TOKEN_DTYPES[self.dtype])
        tokens = np.concatenate([np.asarray(e.ids, little) for e in encodings])
        header = orjson.dumps(
            {"cursor": cursor, "ids": ids, "lengths": lengths, "dtype": self.dtype}
        )
        header += b" " * (-(len(TOKEN_FRAME_MAGIC) + 4 + len(header)) % 4)  # ids 4-byte aligned
        return BinaryFrame(
            TOKEN_FRAME_MAGIC
            + struct.pack("<I", len(header))
            + header
            + tokens.astype(little, copy=False).tobytes()
        )


class Tokenizers:
    """The tokenizers clients uploaded, by sha256 of their tokenizer.json (in memory only)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, Tokenizer] = OrderedDict()

    def mode(self, request: Any, eot_marker: str) -> TokenMode:
        """The token mode a handshake's `consumer.tokens` asks for. Raises ProtocolError."""
        if not isinstance(request, dict):
            raise ProtocolError(
                f"handshake: consumer.tokens must be a JSON object "
                f'{{"tokenizer": "<sha256>", "eos_token": "<text>"}}, got {protocol._show(request)}'
            )
        digest, eos = request.get("tokenizer"), request.get("eos_token")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ProtocolError(
                "handshake: consumer.tokens.tokenizer must be the sha256 of a tokenizer.json, "
                f"64 lowercase hex digits, got {protocol._show(digest)}"
            )
        if not isinstance(eos, str) or not 0 < len(eos) <= _MAX_EOS_CHARS:
            raise ProtocolError(
                "handshake: consumer.tokens.eos_token must be a non-empty string of at most "
                f"{_MAX_EOS_CHARS} characters, got {protocol._show(eos)}"
            )
        tokenizer = self._held.get(digest)
        if tokenizer is None:
            raise ProtocolError(
                f"handshake: this server does not hold tokenizer {digest}; upload it with "
                "putTokenizer (on any connection), then handshake again",
                unknown_tokenizer=digest,
            )
        self._held.move_to_end(digest)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        replace = eot_marker if eot_marker and eot_marker != eos else None
        return TokenMode(tokenizer, replace, eos, "uint16" if vocab <= 1 << 16 else "uint32")

    async def put(self, msg: dict[str, Any]) -> bytes:
        """Answer a putTokenizer: check the upload, hold the tokenizer, confirm."""
        payload = protocol.payload(msg)
        digest, text = payload.get("sha256"), payload.get("tokenizer_json")
        good = isinstance(digest, str) and _SHA256.fullmatch(digest) and isinstance(text, str)
        if not good:
            raise ProtocolError(
                "putTokenizer needs payload.sha256, the sha256 of the tokenizer.json's UTF-8 bytes "
                "in 64 lowercase hex digits, and payload.tokenizer_json, its text; got sha256 "
                f"{protocol._show(digest)} and tokenizer_json {protocol._show(text, 30)}"
            )
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > self.max_bytes:
            raise ProtocolError(
                f"putTokenizer: the tokenizer.json is {len(data)} bytes, over this server's limit "
                f"of {self.max_bytes} (limits.max_tokenizer_bytes)"
            )
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ProtocolError(
                f"putTokenizer: the tokenizer_json sent has sha256 {actual}, not {digest}; "
                "send the sha256 of exactly the UTF-8 bytes uploaded"
            )
        try:
            tokenizer = await asyncio.to_thread(Tokenizer.from_str, text)
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ProtocolError(
                f"putTokenizer: tokenizer_json is not a tokenizer the `tokenizers` library can "
                f"load ({str(e)[:200]})"
            ) from None
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > 1 << 32:
            raise ProtocolError(f"putTokenizer: a vocabulary of {vocab} does not fit in uint32")
        self._held[digest] = tokenizer
        self._held.move_to_end(digest)
        while len(self._held) > MAX_TOKENIZERS:
            self._held.popitem(last=False)
        log.info("tokenizer %s received (vocabulary %d)", digest[:12], vocab)
        return protocol.encode(
            {"type": "tokenizerConfirmation", "payload": {"sha256": digest, "vocab_size": vocab}}
        )
