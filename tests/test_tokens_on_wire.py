"""Tokens on the wire (PROTOCOL.md §3.11) over real connections: the handshake and the upload, the
token frame and its documented layout, bad uploads and bad frames, in either direction."""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import threading

import orjson
import pytest
from tokenizers import Tokenizer
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from streamgpt.data.client import Connection, ServerRefused, put_tokenizer_request
from streamgpt.data.consumer import ConsumerFeed
from streamgpt.data.packing import Encoder
from streamgpt.data.token_frame import read_frame
from streamgpt.data.tokens_on_wire import WireTokens
from streamgpt.server.config import LimitsConfig
from streamgpt.server.corpus import SampleEncoder
from streamgpt.server.streams import ConsumerSpec, open_stream
from streamgpt.server.tokens import TokenMode

from .helpers.servers import ids, stream_cfg
from .helpers.tokens import small_bpe
from .test_protocol_doc import TEXT, transcripts

EOS = "<|endoftext|>"
CONSUMER = {"rank": 0, "world_size": 2, "worker": 0, "num_workers": 1, "seed": 5, "cursor": None}
BYSTANDER = {"rank": 1, "world_size": 2, "seed": 4}


def documented_tokenizer() -> str:
    """The tokenizer.json uploaded in PROTOCOL.md §3.11."""
    for t in transcripts():
        for m in t.messages:
            if m.sent and m.json()["type"] == "putTokenizer":
                return m.json()["payload"]["tokenizer_json"]
    raise AssertionError("PROTOCOL.md uploads no tokenizer")


@pytest.fixture(scope="module")
def tokenizer_json(shakespeare) -> str:
    return small_bpe(shakespeare)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokens_hello(text: str, consumer: dict = CONSUMER) -> dict:
    tokens = {"tokenizer": sha(text), "eos_token": EOS}
    return {"type": "handshake", "version": "1.0", "consumer": {**consumer, "tokens": tokens}}


def error_of(reply: dict) -> dict:
    assert reply["type"] == "error", reply
    return reply["payload"]


def upload(client, url: str, text: str) -> dict:
    return client(url).ask(
        {"type": "putTokenizer", "payload": {"sha256": sha(text), "tokenizer_json": text}}
    )


def expected_stream(corpus, n):
    stream = open_stream(corpus, ConsumerSpec(seed=4, index=1, count=2))
    return [stream.next_chunk().sample_id for _ in range(n)]


# -- the handshake, the upload and the frame -----------------------------------------------------


def test_an_unknown_tokenizer_is_refused_naming_it_then_uploaded_and_accepted(
    serve, client, shakespeare, tokenizer_json
):
    server = serve(shakespeare)
    c = client(server.url, handshake=False)
    assert error_of(c.ask(tokens_hello(tokenizer_json)))["unknown_tokenizer"] == sha(tokenizer_json)
    with pytest.raises(ConnectionClosed) as closed:
        c.recv()
    assert closed.value.rcvd.code == 1008
    confirmed = upload(client, server.url, tokenizer_json)
    assert confirmed == {
        "type": "tokenizerConfirmation",
        "payload": {"sha256": sha(tokenizer_json), "vocab_size": 512},
    }
    reply = client(server.url, handshake=False).ask(tokens_hello(tokenizer_json))
    assert reply["type"] == "handshake" and "tokens" in reply["extensions"]


def test_a_token_frame_holds_what_the_client_would_have_tokenized_from_the_text(
    serve, shakespeare, tokenizer_json
):
    server = serve(shakespeare)
    conn = WireTokens(tokenizer_json, EOS).open(Connection(server.url), CONSUMER)
    text = Connection(server.url).open(CONSUMER)
    assert conn.tokens and not text.tokens
    encode = Encoder(Tokenizer.from_str(tokenizer_json), shakespeare.chunking.eot_marker, EOS)
    for _ in range(3):
        conn.request(7)
        text.request(7)
        got, want = conn.receive_data(), text.receive_data()
        assert got.ids == want.ids and got.cursor == want.cursor and got.texts == []
        assert [t.tolist() for t in got.tokens] == encode(want.texts)
        assert all(t.dtype.str == "<u2" for t in got.tokens)
    conn.close()
    text.close()


def test_the_end_of_the_stream_stays_a_json_terminate(serve, shakespeare, tokenizer_json):
    server = serve(shakespeare, max_samples=6)
    conn = WireTokens(tokenizer_json, EOS).open(Connection(server.url), CONSUMER)
    conn.request(2)
    assert len(conn.receive_data().ids) == 2
    conn.request(2)
    last = conn.receive_data()
    assert len(last.ids) == 1 and last.cursor["n"] == 3  # consumer 0 of 2: 3 of the 6 samples
    conn.request(2)
    end = conn.receive_data()
    assert end.ended and end.cursor == last.cursor and end.tokens is None
    conn.close()


def test_text_consumers_get_the_same_bytes_while_another_reads_tokens(
    serve, client, shakespeare, tokenizer_json
):
    quiet, busy = serve(shakespeare), serve(shakespeare)
    upload(client, busy.url, tokenizer_json)
    reader = WireTokens(tokenizer_json, EOS).open(Connection(busy.url), CONSUMER)
    a, b = client(quiet.url, BYSTANDER), client(busy.url, BYSTANDER)
    for n in (1, 5, 3):
        reader.request(4)
        a.send({"type": "getData", "payload": {"batch_size": n}})
        b.send({"type": "getData", "payload": {"batch_size": n}})
        assert a.ws.recv(10) == b.ws.recv(10)  # byte for byte
        assert len(reader.receive_data().tokens) == 4
    reader.close()


def test_the_documented_example_frame_is_what_the_server_builds():
    block = TEXT.split("<!-- frame: example -->\n```text\n", 1)[1].split("\n```", 1)[0]
    magic, size, header, *tokens = block.splitlines()
    hexes = [re.match(r"((?:[0-9a-f]{2} )+)", line)[1].split() for line in (magic, size, *tokens)]
    frame = b"".join(
        [
            bytes.fromhex("".join(hexes[0] + hexes[1])),
            header.encode(),
            bytes.fromhex("".join(h for line in hexes[2:] for h in line)),
        ]
    )
    assert f"The frame is {len(frame)} bytes" in TEXT
    parsed = read_frame(frame)
    assert parsed.ids == ["hamlet#0", "hamlet#1"]
    assert [t.tolist() for t in parsed.tokens] == [[2, 3, 4, 5, 2, 3], [5, 2, 3, 0]]
    encoder = SampleEncoder()
    samples = [
        encoder.encode("hamlet#0", "to be or not to be"),
        encoder.encode("hamlet#1", f"not to be{EOS}"),
    ]
    tokenizer = Tokenizer.from_str(documented_tokenizer())
    built = TokenMode(tokenizer, None, EOS, "uint16").frame(samples, parsed.cursor)
    assert built == frame


def test_the_header_is_padded_so_the_ids_are_4_byte_aligned(tokenizer_json):
    tokenizer = Tokenizer.from_str(tokenizer_json)
    encoder = SampleEncoder()
    for n in range(1, 9):
        sample = encoder.encode("x" * n, "to be")
        frame = TokenMode(tokenizer, None, EOS, "uint16").frame([sample], {"n": n})
        (size,) = struct.unpack_from("<I", frame, 4)
        assert (8 + size) % 4 == 0 and frame[8 + size - 1 : 8 + size] in (b"}", b" ")
        assert read_frame(frame).ids == ["x" * n]


def test_a_frame_names_each_sample_by_its_id_whatever_its_text_holds(tokenizer_json):
    """The frame reads a sample's id from the encoded sample's tail, without parsing its text."""
    tricky = ['"sample_id": "b#0"}', '\\"sample_id\\":', '"sample_id":"x"', "plain"]
    ids = ['a"b#0', "c\\d#1", "e/f#2", "\u00e9#3"]
    encoder = SampleEncoder(id_prefix="mix/")
    samples = [encoder.encode(f"mix/{i}", t) for i, t in zip(ids, tricky, strict=True)]
    frame = TokenMode(Tokenizer.from_str(tokenizer_json), None, EOS, "uint16").frame(samples, {})
    assert read_frame(frame).ids == [f"mix/{i}" for i in ids]


# -- bad input to the server ----------------------------------------------------------------------


@pytest.fixture
def server(serve, shakespeare):
    return serve(shakespeare, limits=LimitsConfig(max_tokenizer_bytes=50_000))


def test_bad_uploads_get_the_documented_errors_and_nobody_else_notices(
    server, client, shakespeare, tokenizer_json
):
    bystander = client(server.url, BYSTANDER)
    c = client(server.url)
    small = documented_tokenizer()
    huge = small.replace('"decoder":null', '"decoder":null,"pad":"' + "x" * 60_000 + '"')
    cases = [
        ({"sha256": "0" * 64, "tokenizer_json": small}, "not " + "0" * 64 + "; send the sha256"),
        ({"sha256": sha("{}"), "tokenizer_json": "{}"}, "is not a tokenizer the `tokenizers`"),
        ({"sha256": sha("[1,"), "tokenizer_json": "[1,"}, "is not a tokenizer the `tokenizers`"),
        ({"sha256": sha(huge), "tokenizer_json": huge}, "over this server's limit of 50000"),
        ({"sha256": "ABC", "tokenizer_json": small}, "putTokenizer needs payload.sha256"),
        ({"sha256": sha(small)}, "putTokenizer needs payload.sha256"),
        ({"sha256": sha(small), "tokenizer_json": 7}, "putTokenizer needs payload.sha256"),
    ]
    seen = []
    for payload, message in cases:
        reply = c.ask({"type": "putTokenizer", "payload": payload})
        assert message in error_of(reply)["message"], payload.get("tokenizer_json", "")[:40]
        assert c.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
        seen += ids(bystander.data(3))
    assert seen == expected_stream(shakespeare, len(seen)), "the bystander's stream is unchanged"
    # None of them was kept: a handshake naming any of them is refused.
    for digest in ("0" * 64, sha("{}"), sha(huge)):
        hello = tokens_hello(small)
        hello["consumer"]["tokens"]["tokenizer"] = digest
        assert error_of(client(server.url, handshake=False).ask(hello))["unknown_tokenizer"]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("abc", "consumer.tokens must be a JSON object"),
        ({"tokenizer": "abc", "eos_token": EOS}, "consumer.tokens.tokenizer must be the sha256"),
        ({"tokenizer": "a" * 64}, "consumer.tokens.eos_token must be a non-empty string"),
        ({"tokenizer": "a" * 64, "eos_token": ""}, "consumer.tokens.eos_token must be"),
        ({"tokenizer": "a" * 64, "eos_token": EOS}, "does not hold tokenizer " + "a" * 64),
    ],
)
def test_a_bad_token_handshake_gets_an_error_then_a_close(server, client, tokens, message):
    c = client(server.url, handshake=False)
    hello = {"type": "handshake", "version": "1.0", "consumer": {"tokens": tokens}}
    payload = error_of(c.ask(hello))
    assert message in payload["message"]
    assert ("unknown_tokenizer" in payload) == message.startswith("does not hold")
    with pytest.raises(ConnectionClosed) as closed:
        c.recv()
    assert closed.value.rcvd.code == 1008


def test_a_token_frame_sent_by_a_client_is_malformed_json(server, client, tokenizer_json):
    mode = TokenMode(Tokenizer.from_str(tokenizer_json), None, EOS, "uint16")
    frame = mode.frame([SampleEncoder().encode("a#0", "to be")], {"n": 1})
    bystander = client(server.url, BYSTANDER)
    c = client(server.url)
    assert "malformed JSON" in error_of(c.ask(bytes(frame)))["message"]
    assert c.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
    assert len(ids(bystander.data(2))) == 2


# -- a tokenizer the server will not take ----------------------------------------------------------


def request_bytes(text: str) -> int:
    return len(orjson.dumps(put_tokenizer_request(sha(text), text)))


@pytest.mark.parametrize("over", ["max_tokenizer_bytes", "max_frame_bytes"])
def test_a_tokenizer_over_the_servers_limits_is_refused_naming_them_before_it_is_sent(
    serve, client, shakespeare, tokenizer_json, over
):
    size = len(tokenizer_json.encode())
    # The frame limit lets the file itself through, not the request: JSON escapes every quote.
    limit = 1000 if over == "max_tokenizer_bytes" else size + 10
    server = serve(shakespeare, limits=LimitsConfig(**{over: limit}))
    with pytest.raises(ServerRefused) as refused:
        WireTokens(tokenizer_json, EOS).open(Connection(server.url), CONSUMER)
    message = str(refused.value)
    assert message.startswith(
        f"tokens on the wire: the stream server at {server.url} cannot take our tokenizer, "
        f"{size} bytes of tokenizer.json as uploaded (compact JSON): "
    )
    if over == "max_tokenizer_bytes":
        assert (
            ": over its limits.max_tokenizer_bytes=1000. Start the server with a larger " in message
        )
    else:
        assert f"its putTokenizer request is {request_bytes(tokenizer_json)} bytes, over its " in (
            message
        )
        assert f"limits.max_frame_bytes={limit}. Start the server with a larger " in message
    assert message.endswith(
        f"limits.{over} (server.limits.* for the embedded one), train a smaller tokenizer "
        "(tokenizer.vocab_size), or set data.stream.tokens_on_wire=false to read text"
    )
    hello = tokens_hello(tokenizer_json)  # nothing was uploaded
    assert error_of(client(server.url, handshake=False).ask(hello))["unknown_tokenizer"]


def test_an_upload_closed_with_1009_or_refused_is_final_with_the_servers_words(
    serve, shakespeare, tokenizer_json
):
    """Without the check of the limits (a server that does not report them): a close 1009 or an
    error reply to putTokenizer is a refusal, not a lost connection to reconnect after."""
    limit = len(tokenizer_json.encode()) + 10
    server = serve(shakespeare, limits=LimitsConfig(max_frame_bytes=limit))
    conn = Connection(server.url).open()
    with pytest.raises(ServerRefused) as closed:
        conn.put_tokenizer(sha(tokenizer_json), tokenizer_json)
    assert f"the stream server at {server.url} closed the connection (1009, message too big) " in (
        str(closed.value)
    )
    assert f"exceeds limit of {limit} bytes (limits.max_frame_bytes)" in str(closed.value)
    conn = Connection(server.url).open()
    with pytest.raises(ServerRefused) as refused:
        conn.put_tokenizer("0" * 64, "{}")
    assert f"{server.url} did not accept our tokenizer: putTokenizer: the tokenizer_json sent " in (
        str(refused.value)
    )
    conn.close()


# -- bad frames from a server ---------------------------------------------------------------------


def frame_of(header: dict | bytes, body: bytes, size: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else orjson.dumps(header)
    return b"SGT1" + struct.pack("<I", len(head) if size is None else size) + head + body


GOOD = {"cursor": {"n": 2}, "ids": ["a", "b"], "lengths": [1, 2], "dtype": "uint16"}
BAD_FRAMES = [
    (b"SGT1\x05", "truncated: 5 bytes"),
    (b"XXXX" + frame_of(GOOD, b"\x00" * 6)[4:], "bad magic b'XXXX'"),
    (frame_of(GOOD, b"\x00" * 6, size=5000), "announced as 5000 bytes"),
    (frame_of(GOOD, b"\x00" * 4), "wrong lengths: header.lengths add up to 3 uint16 tokens"),
    (frame_of(GOOD, b"\x00" * 8), "but 8 bytes of tokens follow"),
    (frame_of({**GOOD, "lengths": [3]}, b"\x00" * 6), "wrong lengths: header.lengths must hold"),
    (frame_of({**GOOD, "lengths": [-1, 4]}, b"\x00" * 6), "wrong lengths"),
    (frame_of({**GOOD, "dtype": "int8"}, b"\x00" * 6), "dtype 'int8' is not one of"),
    (frame_of(b"{not json", b""), "its header is not JSON"),
    (frame_of(b"[1]", b""), "its header is not a JSON object"),
    (frame_of({**GOOD, "ids": [1, 2]}, b"\x00" * 6), "header.ids is not a list"),
]


class FakeServer:
    """A real WebSocket peer that accepts a token handshake, then answers each getData with the
    next of `frames` (a server with a bug, or a garbling middlebox)."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        async def main() -> None:
            self.server = await ws_serve(self._handle, "127.0.0.1", 0, compression=None)
            self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
            ready.set()
            await self.server.wait_closed()

        self.loop.run_until_complete(main())

    async def _handle(self, ws) -> None:
        await ws.recv()
        extensions = ["consumer", "cursor", "tokens"]
        await ws.send(
            orjson.dumps({"type": "handshake", "version": "1.0", "extensions": extensions})
        )
        for frame in self.frames:
            await ws.recv()
            await ws.send(frame)
        await ws.wait_closed()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


def test_the_client_refuses_a_malformed_token_frame_saying_what_is_wrong(tokenizer_json):
    fake = FakeServer([frame_of(GOOD, b"\x01\x00\x02\x00\x03\x00")] + [f for f, _ in BAD_FRAMES])
    try:
        wire = WireTokens(tokenizer_json, EOS)
        conn = wire.open(Connection(fake.url, recv_timeout=5), CONSUMER)
        conn.request(2)
        good = conn.receive_data()
        assert good.ids == ["a", "b"] and [t.tolist() for t in good.tokens] == [[1], [2, 3]]
        for _, message in BAD_FRAMES:
            conn.request(2)
            with pytest.raises(ConnectionError) as refused:
                conn.receive_data()
            assert "sent a malformed token frame" in str(refused.value)
            assert message in str(refused.value)
        conn.close()
    finally:
        fake.stop()


def test_a_token_id_past_our_vocabulary_stops_the_consumer_naming_it(tokenizer_json):
    """Ids that fit the frame's dtype but not our tokenizer (the server used another one) would
    reach the embedding: the consumer refuses them, finally, rather than train on them."""
    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    body = struct.pack("<3H", 1, 2, vocab)  # the last id is one past the vocabulary
    fake = FakeServer([frame_of({**GOOD, "lengths": [1, 2]}, body)])
    try:
        cfg = stream_cfg(fake.url, batch_size=1, max_length=2, samples_per_request=2)
        feed = ConsumerFeed(
            fake.url, CONSUMER, cfg, lambda texts: [], None, wire=WireTokens(tokenizer_json, EOS)
        )
        with pytest.raises(ServerRefused) as refused:
            next(iter(feed))
    finally:
        fake.stop()
    assert f"sent token id {vocab}, past our tokenizer's vocabulary of {vocab}" in str(
        refused.value
    )
