"""Tokens on the wire (data.stream.tokens_on_wire, docs/PROTOCOL.md §3.11): the consumer names its
tokenizer in the handshake and the server sends token ids instead of text.

A server that does not hold the tokenizer yet (it just started, or restarted) refuses the
handshake with `unknown_tokenizer`; the consumer then uploads it (`putTokenizer`) on a connection
of its own and handshakes again. A server without the extension ignores the request and sends text,
which the consumer tokenizes itself, as without the option (warned once per process).

An upload the server would refuse (over its limits.max_tokenizer_bytes, or a request over its
limits.max_frame_bytes, both in `status`) is not sent: the same upload would fail after every
reconnect, so the consumer stops at once, saying which limit and what to change.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import orjson
from tokenizers import Tokenizer

from streamgpt.data.client import Connection, ServerRefused, UnknownTokenizer, put_tokenizer_request

log = logging.getLogger("streamgpt.data")

_warned: set[str] = set()  # urls of servers already warned about


class WireTokens:
    """What a consumer needs to read token ids: its tokenizer.json and eos token."""

    def __init__(self, tokenizer_json: str, eos_token: str) -> None:
        self.tokenizer_json = tokenizer_json
        self.sha256 = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        self.eos_token = eos_token
        # With added tokens: every id a frame holds must be below it.
        self.vocab_size = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)

    def check_ids(self, tokens: list[np.ndarray], url: str) -> None:
        """Raise ServerRefused if a frame holds an id our tokenizer cannot have made: the
        embedding would fail on it (on a GPU, as a device-side assert far from the cause)."""
        top = max((int(t.max()) for t in tokens if t.size), default=-1)
        if top >= self.vocab_size:
            raise ServerRefused(
                f"tokens on the wire: the stream server at {url} sent token id {top}, past our "
                f"tokenizer's vocabulary of {self.vocab_size} (tokenizer {self.sha256[:12]}): the "
                "server tokenized with another tokenizer. Set data.stream.tokens_on_wire=false to "
                "read text instead"
            )

    def open(self, conn: Connection, consumer: dict[str, Any]) -> Connection:
        """`conn` handshaken as `consumer`, in token mode if the server speaks it."""
        hello = {**consumer, "tokens": {"tokenizer": self.sha256, "eos_token": self.eos_token}}
        try:
            conn.open(hello)
        except UnknownTokenizer:
            conn.open()  # a fresh connection: a failed handshake closed the last one
            try:
                self._upload(conn)
            finally:
                conn.close()
            conn.open(hello)
        if not conn.tokens and conn.url not in _warned:
            _warned.add(conn.url)
            log.warning(
                "%s does not send tokens (no 'tokens' extension): reading text and tokenizing "
                "it here (data.stream.tokens_on_wire=true is ignored for this server)",
                conn.url,
            )
        return conn

    def _upload(self, conn: Connection) -> None:
        """Our tokenizer uploaded on `conn`; a refusal is final: the same upload fails again."""
        self.check_limits(conn.url, conn.status().get("limits"))
        try:
            conn.put_tokenizer(self.sha256, self.tokenizer_json)
        except ServerRefused as e:
            raise ServerRefused(
                f"tokens on the wire: {e}. Set data.stream.tokens_on_wire=false to read text "
                "instead"
            ) from None
        log.info("uploaded tokenizer %s to %s", self.sha256[:12], conn.url)

    def check_limits(self, url: str, limits: Any) -> None:
        """Raise ServerRefused if the server's `status` limits would refuse our upload."""
        if not isinstance(limits, dict):
            return  # a server that does not say: the upload itself will tell
        size = len(self.tokenizer_json.encode())
        request = len(orjson.dumps(put_tokenizer_request(self.sha256, self.tokenizer_json)))
        over = {
            key: text
            for key, n, text in (
                ("max_tokenizer_bytes", size, "over"),
                ("max_frame_bytes", request, f"its putTokenizer request is {request} bytes, over"),
            )
            if isinstance(limits.get(key), int) and n > limits[key]
        }
        if over:
            why = "; ".join(f"{text} its limits.{key}={limits[key]}" for key, text in over.items())
            keys = " and ".join(f"limits.{key}" for key in over)
            raise ServerRefused(
                f"tokens on the wire: the stream server at {url} cannot take our tokenizer, "
                f"{size} bytes of tokenizer.json as uploaded (compact JSON): {why}. Start the "
                f"server with a larger {keys} (server.limits.* for the embedded one), train a "
                "smaller tokenizer (tokenizer.vocab_size), or set data.stream.tokens_on_wire=false "
                "to read text"
            )
