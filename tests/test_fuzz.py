"""Hostile input: property-based fuzzing of every message type and field, floods, odd frames.

Throughout, a bystander consumer keeps reading its own stream; at the end it must be exactly the
stream it would have read on a quiet server.
"""

from __future__ import annotations

import collections
import json
import random
import struct

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from websockets.exceptions import ConnectionClosed

from streamgpt.data.token_frame import FrameError, TokenFrame, read_frame
from streamgpt.server.config import LimitsConfig
from streamgpt.server.corpus import SampleEncoder
from streamgpt.server.protocol import REQUEST_TYPES
from streamgpt.server.streams import ConsumerSpec, open_stream
from streamgpt.server.tokens import TokenMode
from streamgpt.wire import TOKEN_DTYPES

from .helpers.servers import Client, ids
from .helpers.tokens import EOS, small_bpe

BYSTANDER = {"rank": 0, "world_size": 2, "seed": 9}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=25,
)
kinds = st.sampled_from([*REQUEST_TYPES, "bogus", "", "GETDATA", "data", "error"])
messages = st.one_of(
    json_values,
    st.fixed_dictionaries({"type": kinds}, optional={"payload": json_values, "extra": json_values}),
    st.fixed_dictionaries(
        {"type": st.just("getData"), "payload": st.fixed_dictionaries({"batch_size": scalars})}
    ),
    st.fixed_dictionaries(  # around the valid range [1, max_batch_size]
        {
            "type": st.just("getData"),
            "payload": st.fixed_dictionaries({"batch_size": st.integers(-1, 34)}),
        },
        optional={"extra": json_values},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("setValidationIds"),
            "payload": st.fixed_dictionaries(
                {
                    "validation_ids": st.one_of(
                        json_values, st.lists(st.text(max_size=20), max_size=20)
                    )
                }
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("handshake"), "version": scalars, "consumer": json_values}
    ),
)
frames = st.one_of(
    messages.map(lambda m: json.dumps(m)),
    messages.map(lambda m: json.dumps(m).encode()),  # binary frames holding JSON
    st.binary(max_size=300),
    st.text(max_size=300),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(min_value=300, max_value=5000).map(
        lambda n: '{"type": "getData", "payload": {"batch_size": ' + "9" * n + "}}"
    ),
)


@pytest.fixture(scope="module")
def fuzz_server(shakespeare):
    from streamgpt.server import StreamServer

    from .helpers.servers import RunningServer

    server = RunningServer(
        StreamServer(
            shakespeare, port=0, limits=LimitsConfig(max_frame_bytes=64 << 10, max_batch_size=32)
        )
    )
    yield server
    server.stop()


def expected(corpus, n):
    stream = open_stream(corpus, ConsumerSpec(seed=9, index=0, count=2))
    return [c.sample_id for c in stream.take(n)]


def documented_reply(frame: str | bytes, max_batch_size: int = 32) -> str:
    """The reply the protocol promises for one frame on a handshaken connection: the reply type
    of a valid request, or "error" for anything it refuses (worked out here from the protocol's
    rules, not by the server's own parser). JSON is parsed as the protocol defines it: one
    object per frame, integers within 64 bits."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return "error"
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return "error"
    kind, payload = message["type"], message.get("payload")
    if kind in ("heartbeat", "getInfo", "status", "reset"):
        return {"getInfo": "info", "reset": "resetConfirmation"}.get(kind, kind)
    if kind not in ("getData", "setValidationIds"):
        return "error"  # unknown types, and a second handshake
    if payload is not None and not isinstance(payload, dict):
        return "error"
    payload = payload or {}
    if kind == "getData":
        n = payload.get("batch_size")
        valid = type(n) is int and 1 <= n <= max_batch_size
        return "data" if valid else "error"
    ids = payload.get("validation_ids")
    valid = isinstance(ids, list) and all(isinstance(i, str) for i in ids)
    return "validationIdsConfirmation" if valid else "error"


def test_fuzzed_requests_get_the_documented_answer_and_never_disturb_others(
    fuzz_server, shakespeare
):
    bystander = Client(fuzz_server.url)
    bystander.handshake(BYSTANDER)
    seen: list[str] = []
    state = {"client": None, "examples": 0}
    answered: collections.Counter[str] = collections.Counter()

    def fresh() -> Client:
        c = Client(fuzz_server.url)
        c.handshake()
        return c

    # Derandomized: the same 400 frames on every run, so a failure reproduces.
    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(frame=frames)
    @example(frame='{"type": "getData", "payload": {"batch_size": 1}}')  # the valid range's ends
    @example(frame='{"type": "getData", "payload": {"batch_size": 32}}')
    @example(frame='{"type": "getData", "payload": {"batch_size": 0}}')  # just outside it
    @example(frame='{"type": "getData", "payload": {"batch_size": 33}}')
    def check(frame):
        client = state["client"] or fresh()
        state["client"] = client
        state["examples"] += 1
        want = documented_reply(frame)
        client.send(frame)  # no frame here is oversized: the connection must stay open
        reply = client.recv()
        assert reply["type"] == want, (frame[:200], reply)
        answered[want] += 1
        if want == "error":
            assert isinstance(reply["payload"]["message"], str) and reply["payload"]["message"]
        if want == "data":
            n = orjson.loads(frame)["payload"]["batch_size"]
            assert len(reply["payload"]) == n, "a valid getData gets its samples"
        if want == "resetConfirmation":
            assert client.recv()["type"] == "reset"
        assert client.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
        if state["examples"] % 20 == 0:
            seen.extend(ids(bystander.data(4)))

    check()
    assert answered["data"] >= 20 and answered["validationIdsConfirmation"] >= 20, answered
    every_size = fresh()
    for n in range(1, 33):  # every valid batch size, beyond those hypothesis drew
        assert len(ids(every_size.data(n))) == n
    seen.extend(ids(bystander.data(4)))
    assert seen == expected(shakespeare, len(seen)), "the bystander's stream changed"
    status = fresh().ask({"type": "status", "payload": {}})
    assert status["type"] == "status"


def test_a_flood_of_pipelined_requests_is_answered_in_order(fuzz_server, client, shakespeare):
    bystander = client(fuzz_server.url, BYSTANDER)
    flood = client(fuzz_server.url, {"rank": 1, "world_size": 2, "seed": 9})
    kinds = ["heartbeat", "getInfo", "getData", "status"] * 250
    for kind in kinds:
        payload = {"batch_size": 3} if kind == "getData" else {}
        flood.send({"type": kind, "payload": payload})
    assert ids(bystander.data(5)) == expected(shakespeare, 5), "served while the flood is pending"
    answers = [flood.recv()["type"] for _ in kinds]
    assert answers == [{"getInfo": "info", "getData": "data"}.get(k, k) for k in kinds]


def test_an_oversized_frame_and_a_binary_frame_of_junk(fuzz_server, client):
    c = client(fuzz_server.url)
    assert c.ask(b"\x00\x01\x02 binary junk")["type"] == "error"
    c.send("x" * (65 << 10))
    with pytest.raises(ConnectionClosed) as closed:
        c.recv()
    assert closed.value.rcvd.code == 1009


# -- the client's token frame reader -------------------------------------------------------------


@pytest.fixture(scope="module")
def good_frames(shakespeare) -> list[bytes]:
    """Token frames as the server builds them: a real tokenizer, real samples, both dtypes, and a
    sample of no tokens among them."""
    tokenizer = Tokenizer.from_str(small_bpe(shakespeare))
    stream = open_stream(shakespeare, ConsumerSpec(seed=3, index=0, count=1))
    samples = [c.payload for c in stream.take(3)]
    samples.insert(1, SampleEncoder().encode("empty#0", ""))
    return [
        TokenMode(tokenizer, None, EOS, dtype).frame(samples, stream.cursor())
        for dtype in ("uint16", "uint32")
    ]


def _header_of(frame: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack_from("<I", frame, 4)
    return json.loads(frame[8 : 8 + size]), frame[8 + size :]


def _with_header(header: object, body: bytes, pad: bool) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()  # json: it writes ints beyond 64 bits
    if pad:
        head += b" " * (-(8 + len(head)) % 4)
    return b"SGT1" + struct.pack("<I", len(head)) + head + body


ODD_VALUES = [None, True, -1, 0, 1.5, 2**63, 2**64, "3", "", "uint16", [], [1], {}, {"a": 1}]


def _mutate_header(rng: random.Random, header: dict) -> object:
    header = dict(header)
    key = rng.choice(["ids", "lengths", "dtype", "cursor", "whole"])
    if key == "whole":
        return rng.choice(ODD_VALUES)
    value = header.get(key)
    if isinstance(value, list) and value and rng.random() < 0.6:
        value = list(value)
        i = rng.randrange(len(value))
        action = rng.choice(["drop", "add", "nudge", "odd"])
        if action == "drop":
            del value[i]
        elif action == "add":
            value.insert(i, value[i])
        elif action == "nudge" and type(value[i]) is int:
            value[i] += rng.choice([-1, 1])
        else:
            value[i] = rng.choice(ODD_VALUES)
        header[key] = value
    elif rng.random() < 0.2:
        header.pop(key, None)
    else:
        header[key] = rng.choice([*ODD_VALUES, "uint32", "int8", "UINT16"])
    return header


def mutations(frame: bytes, rng: random.Random, n: int):
    """`n` seeded mutations of a good frame, at every layer of it."""
    header, body = _header_of(frame)
    fixed_end = len(frame) - len(body)
    for _ in range(n):
        kind = rng.choice(["truncate", "trail", "bytes", "size", "header", "header+body"])
        if kind == "truncate":
            yield frame[: rng.randrange(len(frame))]
        elif kind == "trail":
            yield frame + rng.randbytes(rng.randint(1, 8))
        elif kind == "bytes":
            mutated = bytearray(frame)
            for _ in range(rng.randint(1, 3)):
                region = rng.choice([(0, 4), (4, 8), (8, fixed_end), (fixed_end, len(frame))])
                mutated[rng.randrange(*region)] = rng.randrange(256)
            yield bytes(mutated)
        elif kind == "size":
            size = fixed_end - 8 + rng.choice([-5, -1, 1, 2, 4, 1 << 31, (1 << 32) - 1 - fixed_end])
            yield frame[:4] + struct.pack("<I", max(size, 0)) + frame[8:]
        else:
            new_body = body
            if kind == "header+body":
                new_body = rng.choice([body[: -rng.randint(1, 4)], body + rng.randbytes(2), b""])
            yield _with_header(_mutate_header(rng, header), new_body, pad=rng.random() < 0.5)


def assert_consistent(frame: bytes, parsed: TokenFrame) -> None:
    """A frame read_frame accepted holds exactly what its header says."""
    header, body = _header_of(frame)
    dtype = np.dtype(TOKEN_DTYPES[header["dtype"]])
    assert parsed.ids == header["ids"] and all(isinstance(i, str) for i in parsed.ids)
    assert len(parsed.tokens) == len(parsed.ids) >= 1, "one token array per sample"
    assert [len(t) for t in parsed.tokens] == header["lengths"]
    assert all(t.dtype == dtype for t in parsed.tokens)
    assert b"".join(t.tobytes() for t in parsed.tokens) == body, "every byte after the header"
    assert isinstance(parsed.cursor, dict) and parsed.cursor == header["cursor"]


def read_or_refusal(frame: bytes) -> TokenFrame | str:
    """The frame read, or the reader's message refusing it."""
    try:
        return read_frame(frame)
    except FrameError as e:
        return str(e)


def test_fuzzed_token_frames_are_read_consistently_or_refused_saying_why(good_frames):
    outcomes: collections.Counter[str] = collections.Counter()
    for frame in good_frames:
        assert_consistent(frame, read_frame(frame))
        for end in range(len(frame)):  # every truncation: each is refused
            with pytest.raises(FrameError):
                read_frame(frame[:end])
        header, _ = _header_of(frame)
        empty = _with_header({**header, "ids": [], "lengths": []}, b"", pad=True)
        assert (
            read_or_refusal(empty) == "header.ids is not a list of sample id strings (at least one)"
        )
    rng = random.Random(20240611)
    for frame in good_frames:
        for mutated in mutations(frame, rng, 4000):
            parsed = read_or_refusal(mutated)  # any other exception fails the test
            if isinstance(parsed, str):
                assert parsed, mutated[:120]
                outcomes[parsed.split(" ", 1)[0]] += 1
            else:
                assert_consistent(mutated, parsed)
                outcomes["read"] += 1
    assert outcomes["read"] >= 150 and sum(outcomes.values()) - outcomes["read"] >= 3000, outcomes
