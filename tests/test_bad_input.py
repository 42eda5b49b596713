"""Bad input gets the documented answer, and the server keeps serving everyone else meanwhile."""

import hashlib

import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamgpt.server.config import LimitsConfig
from streamgpt.server.streams import ConsumerSpec, open_stream

from .helpers.servers import Client, ids

BYSTANDER = {"rank": 1, "world_size": 2, "seed": 4}


def expected_stream(corpus, n):
    stream = open_stream(corpus, ConsumerSpec(seed=4, index=1, count=2))
    return [stream.next_chunk().sample_id for _ in range(n)]


@pytest.fixture
def server(serve, shakespeare):
    return serve(shakespeare, limits=_limits())


def _limits():

    return LimitsConfig(max_frame_bytes=64 << 10, max_batch_size=500, max_tokenizer_bytes=1000)


def error_text(reply: dict) -> str:
    assert reply["type"] == "error", reply
    return reply["payload"]["message"]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _upload(sha256: str, tokenizer_json: object) -> str:
    payload = {"sha256": sha256, "tokenizer_json": tokenizer_json}
    return orjson.dumps({"type": "putTokenizer", "payload": payload}).decode()


_BIG = '{"pad": "' + "x" * 1989 + '"}'  # 2000 bytes, over limits.max_tokenizer_bytes

# (frame sent after a good handshake, text the error must contain)
BAD_REQUESTS = [
    ("{not json", "malformed JSON"),
    ('{"type": "getData", "payload": {"batch_size": 3}', "malformed JSON"),
    ("[1, 2, 3]", "must be a JSON object"),
    ("42", "must be a JSON object"),
    ("null", "must be a JSON object"),
    ('{"payload": {}}', "'type' must be a string"),
    ('{"type": 7}', "'type' must be a string"),
    ('{"type": "explode"}', "unknown message type 'explode'; accepted types: handshake"),
    ('{"type": "getData"}', "getData needs payload.batch_size"),
    ('{"type": "getData", "payload": []}', "'payload' must be a JSON object"),
    ('{"type": "getData", "payload": {"size": 3}}', "getData needs payload.batch_size"),
    ('{"type": "getData", "payload": {"batch_size": 0}}', "positive integer at most 500, got 0"),
    ('{"type": "getData", "payload": {"batch_size": -1}}', "got -1"),
    ('{"type": "getData", "payload": {"batch_size": 501}}', "got 501"),
    ('{"type": "getData", "payload": {"batch_size": 99999999999999999999}}', "positive integer"),
    ('{"type": "getData", "payload": {"batch_size": "32"}}', "got '32' (str)"),
    ('{"type": "getData", "payload": {"batch_size": 3.5}}', "got 3.5 (float)"),
    ('{"type": "getData", "payload": {"batch_size": true}}', "got True (bool)"),
    ('{"type": "getData", "payload": {"batch_size": 1e400}}', "malformed JSON"),
    ('{"type": "setValidationIds", "payload": {}}', "needs payload.validation_ids"),
    ('{"type": "setValidationIds", "payload": {"validation_ids": [1]}}', "list of sample id"),
    ('{"type": "handshake", "version": "1.0"}', "already completed its handshake"),
    ("[" * 5000 + "]" * 5000, "malformed JSON"),
    (b"\xff\xfe not utf-8", "malformed JSON"),
    ('{"type": "' + "x" * 20000 + '"}', "unknown message type"),
    # Tokens on the wire (PROTOCOL.md 3.11): token frames go to clients only; bad uploads.
    (b"SGT1\x08\x00\x00\x00{}      ", "malformed JSON"),
    (b"SGT1\x05", "malformed JSON"),
    ('{"type": "putTokenizer"}', "putTokenizer needs payload.sha256"),
    ('{"type": "putTokenizer", "payload": "x"}', "putTokenizer: 'payload' must be a JSON object"),
    (_upload("ABC", "{}"), "putTokenizer needs payload.sha256"),
    (_upload(_sha("{}"), 7), "putTokenizer needs payload.sha256"),
    (_upload("0" * 64, "{}"), f"has sha256 {_sha('{}')}, not {'0' * 64}; send the sha256 of"),
    (_upload(_sha("{}"), "{}"), "is not a tokenizer the `tokenizers` library can load"),
    (_upload(_sha(_BIG), _BIG), "is 2000 bytes, over this server's limit of 1000 (limits.max_"),
]


def test_each_bad_request_gets_an_error_and_the_connection_stays_usable(
    server, client, shakespeare
):
    bystander = client(server.url, BYSTANDER)
    seen = []
    c = client(server.url)
    for frame, message in BAD_REQUESTS:
        assert message in error_text(c.ask(frame)), frame[:80]
        assert c.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
        seen += ids(bystander.data(3))
    assert len(ids(c.data(5))) == 5
    assert seen == expected_stream(shakespeare, len(seen)), "the bystander's stream is unchanged"


def test_binary_frames_holding_json_are_answered_like_text(server, client):
    c = client(server.url)
    assert c.ask(b'{"type": "heartbeat"}') == {"type": "heartbeat"}
    assert len(c.ask(b'{"type": "getData", "payload": {"batch_size": 4}}')["payload"]) == 4


def test_an_oversized_frame_closes_that_connection_only(server, client, shakespeare):
    bystander = client(server.url, BYSTANDER)
    c = client(server.url)
    c.send('{"type": "heartbeat", "pad": "' + "x" * (65 << 10) + '"}')
    with pytest.raises(ConnectionClosed) as closed:
        c.recv()
    assert closed.value.rcvd.code == 1009  # message too big
    assert ids(bystander.data(5)) == expected_stream(shakespeare, 5)


@pytest.mark.parametrize(
    ("first", "message"),
    [
        ({"type": "handshake", "version": "2.0"}, "Incompatible protocol version '2.0'"),
        ({"type": "handshake"}, "Incompatible protocol version None"),
        ({"type": "getData", "payload": {"batch_size": 1}}, "first message must be"),
        ("not json", "Incompatible protocol version: expected a handshake; malformed JSON"),
        (
            {"type": "handshake", "version": "1.0", "consumer": {"rank": 2, "world_size": 2}},
            "consumer.rank must be an integer in [0, 1], got 2",
        ),
        (
            {"type": "handshake", "version": "1.0", "consumer": {"split": "test"}},
            "consumer.split must be one of ['train', 'validation']",
        ),
        ({"type": "handshake", "version": "1.0", "consumer": {"seed": -1}}, "consumer.seed"),
        (
            {"type": "handshake", "version": "1.0", "consumer": [0]},
            "'consumer' must be a JSON object",
        ),
        (
            {"type": "handshake", "version": "1.0", "consumer": {"world_size": 50}},
            "50 consumers (world_size x num_workers) but the corpus has only 38 training documents",
        ),
        (
            {"type": "handshake", "version": "1.0", "consumer": {"cursor": "abc"}},
            "cursor must be a JSON object this server sent",
        ),
        (
            {"type": "handshake", "version": "1.0", "consumer": {"tokens": "abc"}},
            "consumer.tokens must be a JSON object",
        ),
        (
            {
                "type": "handshake",
                "version": "1.0",
                "consumer": {"tokens": {"tokenizer": "0" * 64, "eos_token": "<|endoftext|>"}},
            },
            f"does not hold tokenizer {'0' * 64}; upload it with putTokenizer",
        ),
    ],
)
def test_a_bad_handshake_gets_an_error_then_a_close(server, client, first, message):
    c = client(server.url, handshake=False)
    assert message in error_text(c.ask(first if isinstance(first, str) else orjson.dumps(first)))
    with pytest.raises(ConnectionClosed) as closed:
        c.recv()
    assert closed.value.rcvd.code == 1008


def test_a_wrong_path_is_refused_before_the_upgrade(server):
    with pytest.raises(InvalidStatus) as refused:
        Client(server.url.replace("/ws", "/other"))
    assert refused.value.response.status_code == 404
