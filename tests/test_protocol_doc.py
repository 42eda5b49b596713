"""docs/PROTOCOL.md stays true: its transcripts are replayed against real servers, and every request
type, reply type, extension, setting, close code and HTTP status the server has is documented.

The document's conventions (section "How to read the examples"): a transcript is a ```text block
right after a marker `<!-- wire: server=NAME connection=NAME [setting=value ...] -->`. Lines
`C: ...` are sent as written, consecutive ones before any reply is read; lines `S: ...` are the
replies, compared exactly except for placeholders; indented lines continue a message;
`S: close CODE (REASON)` is a close. Servers serve the embedded Shakespeare corpus and start, at the
first marker naming them, with that marker's settings (config keys of conf/serve.yaml).
"""

from __future__ import annotations

import dataclasses
import http.client
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streamgpt.server import StreamServer
from streamgpt.server import app as server_app
from streamgpt.server import protocol as server_protocol
from streamgpt.server.config import AuthConfig, EndConfig, LimitsConfig
from streamgpt.server.corpus import Chunking, SampleEncoder, ShardedCorpus
from streamgpt.server.mixture import MixCorpus
from streamgpt.server.protocol import REQUEST_TYPES
from streamgpt.server.streams import ConsumerSpec, open_stream
from streamgpt.wire import EXTENSIONS

from .helpers.servers import Client, RunningServer

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
# The server's code, every module of it (app.py handles connections, gate.py the upgrade).
SERVER_SOURCE = "".join(
    p.read_text() for p in sorted(Path(server_app.__file__).parent.glob("*.py"))
)
TEXT = DOC.read_text(encoding="utf-8")

TRANSCRIPT = re.compile(
    r"^<!-- wire: (?P<marker>[^\n]*?) -->\n```text\n(?P<body>.*?)\n```", re.M | re.S
)
PLACEHOLDER = re.compile(r"<([A-Za-z][\w .:-]*)>")  # not <|endoftext|>
CLOSE = re.compile(r"close (\d{4})(?: \((.*)\))?")
TIMEOUT = 10


# -- reading the document ---------------------------------------------------------------------


@dataclass
class Message:
    sent: bool  # C: (True) or S: (False)
    text: str
    line: int

    def json(self) -> Any:
        return orjson.loads(self.text)


@dataclass
class Transcript:
    server: str
    connection: str
    settings: dict[str, Any]
    line: int
    messages: list[Message] = field(default_factory=list)


def transcripts() -> list[Transcript]:
    out = []
    for match in TRANSCRIPT.finditer(TEXT):
        line = TEXT.count("\n", 0, match.start()) + 1
        fields = dict(item.split("=", 1) for item in match["marker"].split())
        server, connection = fields.pop("server"), fields.pop("connection")
        settings = {key: orjson.loads(value) for key, value in fields.items()}
        t = Transcript(server, connection, settings, line)
        for n, text in enumerate(match["body"].split("\n"), start=line + 2):
            if text.startswith(("C: ", "S: ")):
                t.messages.append(Message(text.startswith("C"), text[3:], n))
            elif text.startswith(" ") and t.messages:
                t.messages[-1].text += "\n" + text
            else:
                raise AssertionError(f"PROTOCOL.md:{n}: not a C:, S: or indented line: {text!r}")
        out.append(t)
    return out


def table(name: str) -> list[int]:
    """The numbers in the first column of the table after `<!-- table: name -->`."""
    rows = TEXT.split(f"<!-- table: {name} -->\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [int(row.split("|")[1]) for row in rows[2:]]


def headings() -> list[str]:
    return [line for line in TEXT.splitlines() if line.startswith("#")]


# -- comparing a real reply with a documented one ---------------------------------------------


def mismatch(doc: Any, real: Any, bound: dict[str, Any], where: str = "") -> str | None:
    """Why `real` does not match the documented `doc`, or None (see the module docstring)."""
    if isinstance(doc, str) and doc == "<number>":
        ok = isinstance(real, int | float) and not isinstance(real, bool)
        return None if ok else f"{where or 'value'}: a number expected, got {real!r}"
    if isinstance(doc, str) and PLACEHOLDER.search(doc):
        if not isinstance(real, str):
            return f"{where or 'value'}: a string expected, got {real!r}"
        return _match_pattern(doc, real, bound, where)
    if isinstance(doc, dict):
        if not isinstance(real, dict) or set(doc) != set(real):
            keys = sorted(real) if isinstance(real, dict) else type(real).__name__
            return f"{where or 'message'}: keys {sorted(doc)} expected, got {keys}"
        for key in doc:
            if (why := mismatch(doc[key], real[key], bound, f"{where}.{key}")) is not None:
                return why
        return None
    if isinstance(doc, list):
        if not isinstance(real, list) or len(doc) != len(real):
            return f"{where or 'value'}: a list of {len(doc)} expected, got {real!r:.300}"
        for i, (d, r) in enumerate(zip(doc, real, strict=True)):
            if (why := mismatch(d, r, bound, f"{where}[{i}]")) is not None:
                return why
        return None
    if type(doc) is not type(real) or doc != real:
        return f"{where or 'value'}: {doc!r} expected, got {real!r:.300}"
    return None


def _match_pattern(doc: str, real: str, bound: dict[str, Any], where: str) -> str | None:
    names, parts, last = [], [], 0
    for m in PLACEHOLDER.finditer(doc):
        names.append(m[1])
        parts += [re.escape(doc[last : m.start()]), "(.*?)"]
        last = m.end()
    parts.append(re.escape(doc[last:]))
    found = re.fullmatch("".join(parts), real, re.S)
    if found is None:
        return f"{where or 'value'}: {doc!r} expected, got {real!r:.300}"
    for name, value in zip(names, found.groups(), strict=True):
        if bound.setdefault(name, value) != value:
            return f"{where}: <{name}> is one value, got {bound[name]!r:.80} and {value!r:.80}"
    return None


# -- replaying ---------------------------------------------------------------------------------


def server_options(settings: dict[str, Any]) -> dict[str, Any]:
    """StreamServer options from config keys as conf/serve.yaml spells them."""
    options: dict[str, Any] = {}
    limits = {}
    for key, value in settings.items():
        group, _, name = key.rpartition(".")
        if group == "limits":
            limits[name] = value
        elif group in ("", "end"):
            options[name] = value
        else:
            raise AssertionError(f"a transcript setting the test does not know: {key}")
    if limits:
        options["limits"] = LimitsConfig(**limits)
    return options


def expect_close(conn: Client, message: Message) -> None:
    code, reason = CLOSE.fullmatch(message.text).groups()
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(TIMEOUT)
    assert closed.value.rcvd is not None, f"PROTOCOL.md:{message.line}: no close frame"
    assert closed.value.rcvd.code == int(code), f"PROTOCOL.md:{message.line}: {closed.value}"
    if reason is not None:
        assert closed.value.rcvd.reason == reason, f"PROTOCOL.md:{message.line}: {closed.value}"


def replay(t: Transcript, conn: Client) -> None:
    messages = t.messages
    i = 0
    while i < len(messages):
        while i < len(messages) and messages[i].sent:
            assert not PLACEHOLDER.search(messages[i].text), (
                f"PROTOCOL.md:{messages[i].line}: requests are sent as written, no placeholders"
            )
            conn.send(messages[i].text)
            i += 1
        while i < len(messages) and not messages[i].sent:
            message = messages[i]
            if CLOSE.fullmatch(message.text):
                expect_close(conn, message)
            else:
                real = conn.recv(TIMEOUT)
                why = mismatch(message.json(), real, {})
                assert why is None, (
                    f"PROTOCOL.md:{message.line}: {why}\nthe server sent: {str(real)[:2000]}"
                )
            i += 1


def test_every_transcript_is_what_the_server_answers(serve, shakespeare):
    servers: dict[str, RunningServer] = {}
    connections: dict[tuple[str, str], Client] = {}
    found = transcripts()
    assert len(found) >= 15
    try:
        for t in found:
            if t.server not in servers:
                servers[t.server] = serve(shakespeare, **server_options(t.settings))
            else:
                assert not t.settings, f"PROTOCOL.md:{t.line}: settings go on a server's first use"
            key = (t.server, t.connection)
            if key not in connections:
                connections[key] = Client(servers[t.server].url)
            replay(t, connections[key])
    finally:
        for conn in connections.values():
            conn.close()


# -- everything the server has is documented ---------------------------------------------------


def answered() -> dict[str, set[str]]:
    """Request types that got a reply other than an error in a transcript, and the reply types."""
    requests, replies = set(), set()
    for t in transcripts():
        pending: list[str | None] = []  # one entry per reply still to come, in order
        for m in t.messages:
            if CLOSE.fullmatch(m.text):
                continue
            try:
                kind = m.json()["type"]
            except (orjson.JSONDecodeError, TypeError, KeyError):
                kind = None  # the malformed requests of the errors section
            if m.sent:
                pending += [kind] * (2 if kind == "reset" else 1)
                continue
            replies.add(kind)
            request = pending.pop(0)
            if kind != "error":
                requests.add(request)
    return {"requests": requests, "replies": replies}


def test_every_request_type_has_a_section_and_a_successful_example():
    titled = " ".join(headings())
    assert [k for k in REQUEST_TYPES if f"`{k}`" not in titled] == []
    assert set(REQUEST_TYPES) - answered()["requests"] == set()


def test_every_reply_type_the_server_sends_is_shown():
    sources = SERVER_SOURCE
    sent = set(re.findall(r'(?:encode\(\s*|b\')\{\s*"type":\s*"(\w+)"', sources))
    assert sent >= {"handshake", "info", "data", "heartbeat", "status", "error"}
    assert sent - answered()["replies"] == set()


def test_every_extension_has_a_section_and_a_row_in_the_overview():
    titled = " ".join(headings())
    assert [name for name in EXTENSIONS if f"(`{name}`)" not in titled] == []
    assert [name for name in EXTENSIONS if f"| extension `{name}` |" not in TEXT] == []


def test_every_consumer_field_and_cursor_field_is_in_its_table(fineweb_row_groups, shakespeare):
    source = Path(server_protocol.__file__).read_text()
    read = r'_field\(c, "(\w+)"|c\.get\("(\w+)"'  # how protocol.py reads a consumer field
    consumer = {a or b for a, b in re.findall(read, source)}
    assert {"rank", "world_size", "worker", "num_workers", "seed", "split", "cursor"} <= consumer
    spec = ConsumerSpec(seed=0, index=0, count=1)
    components = {"a": shakespeare, "b": fineweb_row_groups}
    mixture = MixCorpus(components, [(0, {"a": 1, "b": 1})], Chunking())
    by_step = MixCorpus(
        components, [(0, {"a": 1, "b": 1}), (5, {"a": 1, "b": 2})], Chunking(), "step"
    )
    cursor = (
        set(open_stream(shakespeare, spec).cursor())
        | set(open_stream(fineweb_row_groups, spec).cursor())
        | set(open_stream(mixture, spec).cursor())
        | set(open_stream(by_step, spec).cursor())
    )
    rows = [line for line in TEXT.splitlines() if line.startswith("| `")]
    cells = " ".join(row.split("|")[1] for row in rows)
    assert [name for name in sorted(consumer | cursor) if f"`{name}`" not in cells] == []


def test_every_status_field_of_a_mixture_is_documented(shakespeare):
    mixture = MixCorpus({"plays": shakespeare}, [(0, {"plays": 1})], Chunking())
    status = StreamServer(mixture).status()
    rows = [line for line in TEXT.splitlines() if line.startswith("| `")]
    cells = " ".join(row.split("|")[1] for row in rows)
    assert [key for key in status if f"`{key}`" not in cells] == []
    composition = status["mixture"]
    keys = {*composition, *composition["components"]["plays"]}
    assert [key for key in sorted(keys) if f"`{key}`" not in TEXT] == []
    described = [f"`corpus.{key}`" for key in ("components", "stages") if key in status["corpus"]]
    assert len(described) == 2 and all(key in TEXT for key in described)


def test_every_setting_the_protocol_depends_on_is_documented():
    groups = {"limits": LimitsConfig, "end": EndConfig, "auth": AuthConfig}
    keys = [f"{g}.{f.name}" for g, schema in groups.items() for f in dataclasses.fields(schema)]
    keys += ["compression", "output_name", "seed", "path", "chunk.words", "chunk.eot_marker"]
    assert [key for key in keys if f"`{key}" not in TEXT] == []
    limits = [f"`limits.{f.name}`" for f in dataclasses.fields(LimitsConfig)]
    limit_rows = [line for line in TEXT.splitlines() if line.startswith("| `limits.")]
    assert [line.split("|")[1].strip() for line in limit_rows] == limits


# -- close codes and HTTP statuses: the tables, each row provoked ------------------------------


def _closed(conn: Client) -> Any:
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(TIMEOUT)
    return closed.value.rcvd


def close_when_idle(serve, corpus) -> Any:
    server = serve(corpus, limits=LimitsConfig(idle_timeout_s=0.3))
    conn = Client(server.url)
    conn.handshake()
    frame = _closed(conn)
    assert frame.reason == "idle for 0.3 s (limits.idle_timeout_s)"
    return frame


def close_on_shutdown(serve, corpus) -> Any:
    server = RunningServer(StreamServer(corpus, port=0))
    conn = Client(server.url)
    conn.handshake()
    server.stop()
    return _closed(conn)


def close_on_a_bad_handshake(serve, corpus) -> Any:
    conn = Client(serve(corpus).url)
    assert conn.ask({"type": "handshake", "version": "0.9"})["type"] == "error"
    return _closed(conn)


def close_on_an_oversized_message(serve, corpus) -> Any:
    conn = Client(serve(corpus, limits=LimitsConfig(max_frame_bytes=1000)).url)
    conn.handshake()
    conn.send('{"type": "heartbeat", "pad": "' + "x" * 1000 + '"}')
    return _closed(conn)


def close_when_serving_fails(serve, corpus) -> Any:
    def no_rows(unit: int, first_row: int):
        return iter(())

    empty = ShardedCorpus(
        "empty",
        ["empty.parquet"],
        no_rows,
        chunking=Chunking(),
        encoder=SampleEncoder(),
        validation_fraction=0.0,
        min_words=1,
        window=4,
        description={"source": "empty"},
    )
    conn = Client(serve(empty).url)
    conn.handshake({})
    conn.send({"type": "getData", "payload": {"batch_size": 1}})
    return _closed(conn)


CLOSES: dict[int, list[Callable[..., Any]]] = {
    1001: [close_when_idle, close_on_shutdown],
    1008: [close_on_a_bad_handshake],
    1009: [close_on_an_oversized_message],
    1011: [close_when_serving_fails],
}


def test_the_close_code_table_lists_every_code_and_each_is_what_the_server_sends(
    serve, shakespeare
):
    source = SERVER_SOURCE
    in_code = {int(code) for code in re.findall(r"\.close\((\d{4})", source)}
    documented = set(table("close-codes"))
    assert in_code <= documented, "a close code in the server's code is missing from the table"
    assert documented == set(CLOSES), "every row of the table is provoked below"
    for code, provocations in CLOSES.items():
        for provoke in provocations:
            assert provoke(serve, shakespeare).code == code, provoke.__name__


def _upgrade_status(url: str, **options) -> int:
    try:
        Client(url, **options).close()
    except InvalidStatus as e:
        return e.response.status_code
    return 101


def _raw_status(url: str, headers: dict[str, str]) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        conn.request("GET", parts.path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def wrong_path(serve, corpus) -> int:
    return _upgrade_status(serve(corpus).url.replace("/ws", "/other"))


def no_token(serve, corpus) -> int:
    url = serve(corpus, token="s3cret").url
    assert _upgrade_status(url, additional_headers={"Authorization": "Bearer s3cret"}) == 101
    return _upgrade_status(url, additional_headers={"Authorization": "Bearer wrong"})


def at_the_connection_cap(serve, corpus) -> int:
    server = serve(corpus, limits=LimitsConfig(max_connections=1))
    held = Client(server.url)
    try:
        return _upgrade_status(server.url)
    finally:
        held.close()


def not_an_upgrade(serve, corpus) -> int:
    return _raw_status(serve(corpus).url, {})


def a_malformed_upgrade(serve, corpus) -> int:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    return _raw_status(serve(corpus).url, headers)


def another_origin(serve, corpus) -> int:
    url = serve(corpus, origins=["https://lab.example.org"]).url
    assert _upgrade_status(url, origin="https://lab.example.org") == 101
    return _upgrade_status(url, origin="https://elsewhere.example.com")


REFUSALS: dict[int, Callable[..., int]] = {
    404: wrong_path,
    401: no_token,
    503: at_the_connection_cap,
    426: not_an_upgrade,
    400: a_malformed_upgrade,
    403: another_origin,
}


def test_the_http_status_table_lists_every_refusal_and_each_is_what_the_server_sends(
    serve, shakespeare
):
    source = SERVER_SOURCE
    in_code = {HTTPStatus[name].value for name in re.findall(r"HTTPStatus\.(\w+)", source)}
    documented = table("http-statuses")
    assert in_code <= set(documented), (
        "an HTTP status in the server's code is missing from the table"
    )
    assert documented == list(REFUSALS), "the table's rows, in the order the server checks them"
    for status, provoke in REFUSALS.items():
        assert provoke(serve, shakespeare) == status, provoke.__name__


# -- claims made in prose ----------------------------------------------------------------------


def test_a_binary_frame_holding_json_is_answered_like_a_text_frame(serve, shakespeare):
    conn = Client(serve(shakespeare).url)
    conn.handshake()
    assert conn.ask(b'{"type": "heartbeat"}') == {"type": "heartbeat"}
    conn.close()


def test_a_reset_is_answered_to_its_sender_only(serve, shakespeare):
    server = serve(shakespeare)
    other, conn = Client(server.url), Client(server.url)
    other.handshake()
    conn.handshake()
    conn.send({"type": "reset"})
    assert [conn.recv(TIMEOUT)["type"] for _ in range(2)] == ["resetConfirmation", "reset"]
    time.sleep(0.3)  # a broadcast, if there were one, would be waiting before the heartbeat
    assert other.ask({"type": "heartbeat"}) == {"type": "heartbeat"}
    other.close()
    conn.close()


@pytest.mark.parametrize("compression", [False, True])
def test_deflate_is_accepted_only_when_compression_is_on(serve, shakespeare, compression):
    conn = Client(serve(shakespeare, compression=compression).url, compression="deflate")
    accepted = conn.ws.response.headers.get("Sec-WebSocket-Extensions") or ""
    assert accepted.startswith("permessage-deflate") == compression
    conn.close()
