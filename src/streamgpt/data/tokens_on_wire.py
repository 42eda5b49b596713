"""Tokens on the wire (data.stream.tokens_on_wire, docs/PROTOCOL.md §3.11): the consumer names its
tokenizer in the handshake and the server sends token ids instead of text.

A server that does not hold the tokenizer yet (it just started, or restarted) refuses the
handshake with `unknown_tokenizer`; the consumer then uploads it (`putTokenizer`) on a connection
of its own and handshakes again. A server without the extension ignores the request and sends text,
which the consumer tokenizes itself, as without the option (warned once per process).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from streamgpt.data.client import Connection, UnknownTokenizer

log = logging.getLogger("streamgpt.data")

_warned: set[str] = set()  # urls of servers already warned about


class WireTokens:
    """What a consumer needs to read token ids: its tokenizer.json and eos token."""

    def __init__(self, tokenizer_json: str, eos_token: str) -> None:
        self.tokenizer_json = tokenizer_json
        self.sha256 = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        self.eos_token = eos_token

    def open(self, conn: Connection, consumer: dict[str, Any]) -> Connection:
        """`conn` handshaken as `consumer`, in token mode if the server speaks it."""
        hello = {**consumer, "tokens": {"tokenizer": self.sha256, "eos_token": self.eos_token}}
        try:
            conn.open(hello)
        except UnknownTokenizer:
            conn.open()  # a fresh connection: a failed handshake closed the last one
            try:
                conn.put_tokenizer(self.sha256, self.tokenizer_json)
                log.info("uploaded tokenizer %s to %s", self.sha256[:12], conn.url)
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
