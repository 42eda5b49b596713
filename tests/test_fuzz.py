"""Hostile input: property-based fuzzing of every message type and field, floods, odd frames.

Throughout, a bystander consumer keeps reading its own stream; at the end it must be exactly the
stream it would have read on a quiet server.
"""

from __future__ import annotations

import collections
import json
import random
import re
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
from .helpers.tokens import EOS, TokenReader, sha, small_bpe
from .test_tokens_on_wire import documented_tokenizer

BYSTANDER = {"rank": 0, "world_size": 2, "seed": 9}
MAX_TOKENIZER = 16 << 10  # the fuzzed server's limits.max_tokenizer_bytes

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


def against_a_server(max_examples: int) -> settings:
    """Hypothesis settings for fuzzing a live server: reproducible examples, no deadline (a reply
    takes what the machine gives it), no saved database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def fuzz_server(shakespeare):
    from streamgpt.server import StreamServer

    from .helpers.servers import RunningServer

    server = RunningServer(
        StreamServer(
            shakespeare,
            port=0,
            limits=LimitsConfig(
                max_frame_bytes=64 << 10, max_batch_size=32, max_tokenizer_bytes=MAX_TOKENIZER
            ),
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
    @against_a_server(max_examples=400)
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


# -- tokens on the wire: binary frames and uploads sent to the server ---------------------------

TOKEN_READER = {"rank": 1, "world_size": 2, "worker": 0, "num_workers": 1, "seed": 7}
SMALL_TOKENIZER = documented_tokenizer()  # PROTOCOL.md §3.11's, some 400 bytes


@pytest.fixture(scope="module")
def token_reader(fuzz_server, shakespeare):
    """A token-mode consumer on the fuzzed server, checked frame by frame (its tokenizer is a
    real BPE of the corpus, uploaded by the client as in training)."""
    reader = TokenReader(fuzz_server.url, shakespeare, small_bpe(shakespeare), TOKEN_READER)
    yield reader
    reader.close()


def echoed_frame(url: str) -> bytes:
    """A token frame as the server sends it, to send back."""
    upload = {"sha256": sha(SMALL_TOKENIZER), "tokenizer_json": SMALL_TOKENIZER}
    uploader = Client(url)
    uploader.handshake()
    assert (
        uploader.ask({"type": "putTokenizer", "payload": upload})["type"] == "tokenizerConfirmation"
    )
    uploader.close()
    c = Client(url)
    c.handshake({"seed": 1, "tokens": {"tokenizer": sha(SMALL_TOKENIZER), "eos_token": EOS}})
    c.send({"type": "getData", "payload": {"batch_size": 2}})
    frame = c.ws.recv(10)
    c.close()
    assert isinstance(frame, bytes) and frame.startswith(b"SGT1")
    return frame


binary_frames = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"SGT1" + b),
    st.builds(  # a header length, true or not, then anything
        lambda n, rest: b"SGT1" + struct.pack("<I", n) + rest,
        st.integers(0, 2**32 - 1),
        st.binary(max_size=60),
    ),
    st.tuples(st.floats(0, 1), st.binary(max_size=3)),  # a real frame cut there, these bytes added
)


def test_fuzzed_binary_frames_get_malformed_json_and_token_readers_read_on(
    fuzz_server, token_reader
):
    echo = echoed_frame(fuzz_server.url)
    c = Client(fuzz_server.url)
    c.handshake()
    answered: collections.Counter[str] = collections.Counter()
    frames_read = token_reader.frames

    @against_a_server(max_examples=300)
    @given(frame=binary_frames)
    @example(frame=(1.0, b""))  # the frame sent back whole
    @example(frame=(0.0, b"SGT1\x05"))  # a truncated fixed part
    def check(frame):
        if isinstance(frame, tuple):
            cut, extra = frame
            frame = echo[: int(len(echo) * cut)] + extra
        try:
            orjson.loads(frame)
        except orjson.JSONDecodeError:
            reply = c.ask(frame)
            assert reply["type"] == "error", (frame[:100], reply)
            assert reply["payload"]["message"].startswith("malformed JSON ("), reply
            answered["malformed"] += 1
        else:  # random bytes that happen to be JSON: answered as JSON
            assert c.ask(frame)["type"] == documented_reply(frame)
        assert c.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
        if sum(answered.values()) % 10 == 0:
            token_reader.check(3)

    check()
    assert answered["malformed"] >= 250, answered
    token_reader.check(5)
    assert token_reader.frames - frames_read >= 25


def documented_upload_reply(payload: object) -> tuple[str, str]:
    """What PROTOCOL.md §3.11 promises for a putTokenizer with this payload: the reply type and
    the start of the error message (in the order the server checks, as documented)."""
    if payload is not None and not isinstance(payload, dict):
        return "error", "putTokenizer: 'payload' must be a JSON object, got "
    payload = payload or {}
    digest, text = payload.get("sha256"), payload.get("tokenizer_json")
    hex64 = isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)
    if not hex64 or not isinstance(text, str):
        return "error", "putTokenizer needs payload.sha256, the sha256 of the tokenizer.json's "
    size = len(text.encode())
    if size > MAX_TOKENIZER:
        return "error", (
            f"putTokenizer: the tokenizer.json is {size} bytes, over this server's limit of "
            f"{MAX_TOKENIZER} (limits.max_tokenizer_bytes)"
        )
    if sha(text) != digest:
        return "error", (
            f"putTokenizer: the tokenizer_json sent has sha256 {sha(text)}, not {digest}; send the "
            "sha256 of exactly the UTF-8 bytes uploaded"
        )
    if loads_as_tokenizer(text) is None:
        return "error", "putTokenizer: tokenizer_json is not a tokenizer the `tokenizers` library "
    return "tokenizerConfirmation", ""


def loads_as_tokenizer(text: str) -> Tokenizer | None:
    try:
        return Tokenizer.from_str(text)
    except Exception:  # the tokenizers library raises plain Exceptions
        return None


def padded(over: int) -> str:
    """The small tokenizer, whitespace-padded to `over` bytes past limits.max_tokenizer_bytes."""
    return SMALL_TOKENIZER + " " * (MAX_TOKENIZER - len(SMALL_TOKENIZER.encode()) + over)


def _edit(text: str, at: float, new: str) -> str:
    i = int(at * (len(text) - 1))
    return text[:i] + new + text[i + 1 :]


tokenizer_texts = st.one_of(
    st.just(SMALL_TOKENIZER),
    st.floats(0, 1).map(lambda at: SMALL_TOKENIZER[: int(at * len(SMALL_TOKENIZER))]),
    st.builds(_edit, st.just(SMALL_TOKENIZER), st.floats(0, 1), st.characters()),
    st.builds(_edit, st.just(SMALL_TOKENIZER), st.floats(0, 1), st.just("")),
    # Whitespace-padded around limits.max_tokenizer_bytes: at it is accepted, one byte over is not.
    st.integers(-2, 2).map(padded),
    st.text(max_size=60),
)


def _wrong_digests(text: str):
    right = sha(text)
    return st.sampled_from([right.upper(), right[:63], right + "0", sha(text + " "), "0" * 64])


right_uploads = tokenizer_texts.map(lambda text: {"sha256": sha(text), "tokenizer_json": text})
uploads = st.one_of(
    right_uploads,
    right_uploads,
    right_uploads,
    tokenizer_texts.flatmap(
        lambda text: _wrong_digests(text).map(lambda d: {"sha256": d, "tokenizer_json": text})
    ),
    st.fixed_dictionaries(  # wrong types, missing fields, other fields
        {},
        optional={
            "sha256": scalars | st.just(sha(SMALL_TOKENIZER)),
            "tokenizer_json": scalars,
            "extra": json_values,
        },
    ),
    json_values,  # mostly not an object
)


def test_fuzzed_uploads_get_the_documented_error_and_token_readers_read_on(
    fuzz_server, token_reader
):
    c = Client(fuzz_server.url)
    c.handshake()
    answered: collections.Counter[str] = collections.Counter()
    frames_read = token_reader.frames

    @against_a_server(max_examples=300)
    @given(payload=uploads)
    @example(payload={"sha256": sha(padded(0)), "tokenizer_json": padded(0)})  # at the limit
    @example(payload={"sha256": sha(padded(1)), "tokenizer_json": padded(1)})  # a byte over
    def check(payload):
        kind, message = documented_upload_reply(payload)
        request = {"type": "putTokenizer", "payload": payload}
        reply = c.ask(json.dumps(request))  # json: it writes the integers beyond 64 bits
        assert reply["type"] == kind, (str(payload)[:200], reply)
        if kind == "error":
            assert reply["payload"]["message"].startswith(message), (message, reply)
            answered[message[:30]] += 1
        else:
            text = payload["tokenizer_json"]
            vocab = loads_as_tokenizer(text).get_vocab_size(with_added_tokens=True)
            assert reply["payload"] == {"sha256": sha(text), "vocab_size": vocab}
            answered["confirmed"] += 1
        assert c.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
        if sum(answered.values()) % 10 == 0:
            token_reader.check(3)

    check()
    assert min(answered.values()) >= 5 and len(answered) == 6, answered
    # A request over limits.max_frame_bytes is not answered: its connection is closed, 1009.
    huge = SMALL_TOKENIZER + " " * (64 << 10)
    c.send(
        json.dumps(
            {"type": "putTokenizer", "payload": {"sha256": sha(huge), "tokenizer_json": huge}}
        )
    )
    with pytest.raises(ConnectionClosed) as closed:
        c.recv()
    assert closed.value.rcvd.code == 1009
    token_reader.check(5)
    assert token_reader.frames - frames_read >= 25
