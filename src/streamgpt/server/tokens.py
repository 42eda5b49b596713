"""Tokens on the wire (docs/PROTOCOL.md §3.11): the server tokenizes for a consumer that asks.

A consumer names its tokenizer by the sha256 of its tokenizer.json in the handshake
(`consumer.tokens`); a server that does not hold it refuses the handshake with an
`unknown_tokenizer` error, and the client uploads it with `putTokenizer` on any connection. The
consumer's `getData` is then answered with one binary frame of token ids: the samples tokenized
exactly as the client's own Encoder (data/packing.py) would, the server's end-of-text marker
replaced by the consumer's eos token and no special tokens added, so batches are the same bits.
Tokenizing runs in a worker thread: other connections are not stalled by it. With the token cache
(server/token_cache.py) a sample's ids come from disk once its corpus has been tokenized, and the
uploaded tokenizers are kept there too, so a restarted server, or another server on the same
cache folder, knows them without a new upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from tokenizers import Tokenizer

from streamgpt.atomic import write_atomic
from streamgpt.server import protocol
from streamgpt.server.corpus import sample_id_of
from streamgpt.server.protocol import ProtocolError
from streamgpt.wire import TOKEN_DTYPES, TOKEN_FRAME_MAGIC

if TYPE_CHECKING:
    from streamgpt.server.token_cache import CorpusTokens

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
    digest: str = ""  # the sha256 of the tokenizer.json
    cached: CorpusTokens | None = None  # the token cache's entries for the served corpus

    def frame(self, samples: list[bytes], cursor: dict[str, Any]) -> BinaryFrame:
        """The samples (at least one, as the JSON a text reply would carry) as one token frame:
        each sample's ids from the token cache, or tokenized here (one batch for the rest)."""
        little = np.dtype(TOKEN_DTYPES[self.dtype])
        ids, arrays, missed, texts = [], [], [], []
        for sample in samples:
            ids.append(sample_id_of(sample))  # the text is parsed only if it is to be tokenized
            hit = self.cached.lookup(ids[-1]) if self.cached is not None else None
            if hit is None:
                missed.append(len(arrays))
                texts.append(next(iter(orjson.loads(sample)["inputs"].values())))
            arrays.append(hit)
        if texts:
            if self.replace:
                texts = [t.replace(self.replace, self.eos_token) for t in texts]
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            for i, encoding in zip(missed, encodings, strict=True):
                arrays[i] = np.asarray(encoding.ids, little)
        if self.cached is not None:
            self.cached.count(len(ids) - len(missed), len(missed))
        lengths = [len(a) for a in arrays]
        tokens = np.concatenate(arrays)
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
    """The tokenizers clients uploaded, by sha256 of their tokenizer.json: held in memory, and
    kept as `<sha256>.json` in `store` when there is one (the token cache's folder)."""

    def __init__(self, max_bytes: int, store: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.store = store
        self._held: OrderedDict[str, Tokenizer] = OrderedDict()

    async def mode(self, request: Any, eot_marker: str) -> TokenMode:
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
        if tokenizer is None and self.store is not None:
            tokenizer = await asyncio.to_thread(self._recall, digest)
            if tokenizer is not None:
                self._hold(digest, tokenizer)
        if tokenizer is None:
            raise ProtocolError(
                f"handshake: this server does not hold tokenizer {digest}; upload it with "
                "putTokenizer (on any connection), then handshake again",
                unknown_tokenizer=digest,
            )
        self._held.move_to_end(digest)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        replace = eot_marker if eot_marker and eot_marker != eos else None
        dtype = "uint16" if vocab <= 1 << 16 else "uint32"
        return TokenMode(tokenizer, replace, eos, dtype, digest)

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
        self._hold(digest, tokenizer)
        if self.store is not None:
            await asyncio.to_thread(self._keep, digest, data)
        log.info("tokenizer %s received (vocabulary %d)", digest[:12], vocab)
        return protocol.encode(
            {"type": "tokenizerConfirmation", "payload": {"sha256": digest, "vocab_size": vocab}}
        )

    def _hold(self, digest: str, tokenizer: Tokenizer) -> None:
        self._held[digest] = tokenizer
        self._held.move_to_end(digest)
        while len(self._held) > MAX_TOKENIZERS:
            self._held.popitem(last=False)

    def _keep(self, digest: str, data: bytes) -> None:
        assert self.store is not None
        path = self.store / f"{digest}.json"
        try:
            write_atomic(path, data)  # even over a file there: one that failed its check
        except OSError as e:  # the upload still succeeds: the tokenizer is held in memory
            log.warning("cannot keep tokenizer %s in %s (%s)", digest[:12], self.store, e)

    def _recall(self, digest: str) -> Tokenizer | None:
        """The tokenizer this or another server kept, its sha256 checked again (None: upload)."""
        assert self.store is not None
        path = self.store / f"{digest}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read %s (%s); the client will upload the tokenizer", path, e)
            return None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            log.warning(
                "%s has sha256 %s, not its name: ignored, the client will upload the tokenizer",
                path,
                actual,
            )
            return None
        try:
            return Tokenizer.from_str(data.decode("utf-8", "surrogatepass"))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            log.warning("%s does not load (%s): the client will upload the tokenizer", path, e)
            return None
