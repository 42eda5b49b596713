"""Protocol 1.0 (docs/PROTOCOL.md): parsing what clients send, encoding what the server answers.

Every parse error is a `ProtocolError` whose text says what was wrong and what is accepted; the
server sends it back as an `error` message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from streamgpt.server.streams import SPLITS, ConsumerSpec
from streamgpt.wire import EXTENSIONS, PROTOCOL_VERSION

REQUEST_TYPES = (
    "handshake",
    "getInfo",
    "getData",
    "heartbeat",
    "status",
    "reset",
    "setValidationIds",
    "putTokenizer",
)
_ACCEPTED = ", ".join(REQUEST_TYPES)
_MAX_SEED = 2**63 - 1


class ProtocolError(Exception):
    """A request the server answers with an `error` message; `fields` go into its payload beside
    the message (for a client to act on, such as `unknown_tokenizer`)."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.fields = fields


def _show(value: Any, limit: int = 60) -> str:
    """A short description of a client's value for an error message (it may be huge or hostile)."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode(frame: str | bytes) -> dict[str, Any]:
    """One client frame (text, or binary holding JSON) as a message with a string `type`."""
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(
            f"malformed JSON ({e}); send one JSON object per frame, e.g. "
            '{"type": "getData", "payload": {"batch_size": 32}}'
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError(
            f"a message must be a JSON object with a string 'type', got a JSON {type(msg).__name__}"
        )
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(
            f"message field 'type' must be a string, got {_show(kind)}; accepted types: {_ACCEPTED}"
        )
    return msg


def payload(msg: dict[str, Any]) -> dict[str, Any]:
    value = msg.get("payload")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{msg['type']}: 'payload' must be a JSON object, got {_show(value)}")
    return value


def batch_size(msg: dict[str, Any], limit: int) -> int:
    fields = payload(msg)
    if "batch_size" not in fields:
        raise ProtocolError(
            f"getData needs payload.batch_size, a positive integer at most {limit}, e.g. "
            '{"type": "getData", "payload": {"batch_size": 32}}'
        )
    n = fields["batch_size"]
    if not _is_int(n) or not 1 <= n <= limit:
        raise ProtocolError(
            f"getData: batch_size must be a positive integer at most {limit}, got {_show(n)}"
        )
    return n


def validation_ids(msg: dict[str, Any]) -> list[str]:
    ids = payload(msg).get("validation_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ProtocolError(
            "setValidationIds needs payload.validation_ids, a list of sample id strings, got "
            f"{_show(ids)}"
        )
    return ids


@dataclass(frozen=True)
class Handshake:
    consumer: ConsumerSpec | None  # None: a core-protocol client on the shared stream
    epoch: int = 0
    cursor: Any = None
    stage: int | None = None  # a mixture's stage from a step (None: the cursor's, or 0)
    tokens: Any = None  # tokens on the wire: the consumer's tokenizer (server/tokens.py checks it)


def handshake(msg: dict[str, Any]) -> Handshake:
    """Parse the first message. Raises ProtocolError; the server then closes the connection."""
    if msg.get("type") != "handshake":
        raise ProtocolError(
            f"Incompatible protocol version: the first message must be "
            f'{{"type": "handshake", "version": "{PROTOCOL_VERSION}"}}, got type '
            f"{_show(msg.get('type'))}"
        )
    if msg.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Incompatible protocol version {_show(msg.get('version'))}: this server speaks "
            f'"{PROTOCOL_VERSION}"'
        )
    consumer = msg.get("consumer")
    if consumer is None:
        return Handshake(None)
    if not isinstance(consumer, dict):
        raise ProtocolError(f"handshake: 'consumer' must be a JSON object, got {_show(consumer)}")
    return _consumer(consumer)


def _field(consumer: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = consumer.get(name, default)
    if not _is_int(value) or not low <= value <= high:
        raise ProtocolError(
            f"handshake: consumer.{name} must be an integer in [{low}, {high}], got {_show(value)}"
        )
    return value


def _consumer(c: dict[str, Any]) -> Handshake:
    world = _field(c, "world_size", 1, 1, 1 << 20)
    workers = _field(c, "num_workers", 1, 1, 1 << 16)
    rank = _field(c, "rank", 0, 0, world - 1)
    worker = _field(c, "worker", 0, 0, workers - 1)
    seed = _field(c, "seed", 0, 0, _MAX_SEED)
    epoch = _field(c, "epoch", 0, 0, 1 << 40)
    split = c.get("split", "train")
    if split not in SPLITS:
        raise ProtocolError(
            f"handshake: consumer.split must be one of {list(SPLITS)}, got {_show(split)}"
        )
    stage = c.get("stage")
    if stage is not None and (not _is_int(stage) or not 0 <= stage <= 1 << 16):
        raise ProtocolError(
            f"handshake: consumer.stage must be null or an integer in [0, {1 << 16}], "
            f"got {_show(stage)}"
        )
    spec = ConsumerSpec(
        seed=seed, index=rank * workers + worker, count=world * workers, split=split
    )
    return Handshake(spec, epoch, c.get("cursor"), stage, c.get("tokens"))


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def error(message: str, **fields: Any) -> bytes:
    return encode({"type": "error", "payload": {"message": message, **fields}})


def handshake_reply() -> bytes:
    return encode(
        {"type": "handshake", "version": PROTOCOL_VERSION, "extensions": list(EXTENSIONS)}
    )


def info_reply(output_name: str) -> bytes:
    outputs = {output_name: {"type": "sequence", "shape": None}}
    return encode({"type": "info", "payload": {"inputs": {}, "outputs": outputs}})


def data_reply(samples: list[bytes], cursor: dict[str, Any] | None) -> bytes:
    # One join, so a reply of megabytes is allocated and copied once.
    parts = [b'{"type":"data","payload":[']
    for sample in samples:
        parts += (sample, b",")
    if samples:
        parts.pop()
    else:
        parts.append(b'"terminate"')
    parts.append(b"]}" if cursor is None else b'],"cursor":' + orjson.dumps(cursor) + b"}")
    return b"".join(parts)


HEARTBEAT = encode({"type": "heartbeat"})
# EIR's client reads exactly two replies to a reset, in this order, and fails on one.
RESET_REPLIES = (
    encode({"type": "resetConfirmation", "payload": {"message": "Reset successful"}}),
    encode({"type": "reset", "payload": {"message": "Reset command received"}}),
)


def validation_confirmation(count: int) -> bytes:
    return encode(
        {
            "type": "validationIdsConfirmation",
            "payload": {"message": f"Received {count} validation IDs"},
        }
    )
