"""docs/PROTOCOL.md describes every message, extension and close code the server has."""

from __future__ import annotations

import re
from pathlib import Path

from streamgpt.server import app, protocol
from streamgpt.wire import EXTENSIONS, PROTOCOL_VERSION

DOC = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
SERVER = "".join(p.read_text() for p in Path(app.__file__).parent.glob("*.py"))


def test_every_request_extension_and_reply_is_documented():
    for name in (*protocol.REQUEST_TYPES, *EXTENSIONS):
        assert f"`{name}`" in DOC or f"### {name}" in DOC, name
    for reply in ("handshake", "info", "data", "heartbeat", "error", "status"):
        assert f'{{"type": "{reply}"' in DOC, reply
    assert f'"version": "{PROTOCOL_VERSION}"' in DOC


def test_every_close_code_and_http_status_the_server_uses_is_documented():
    codes = set(re.findall(r"ws\.close\((\d{4})", SERVER)) | {"1009"}  # 1009: websockets' max_size
    statuses = set(re.findall(r"HTTPStatus\.(\w+)", SERVER))
    numbers = {"NOT_FOUND": "404", "UNAUTHORIZED": "401", "SERVICE_UNAVAILABLE": "503"}
    assert codes >= {"1001", "1008"} and statuses, (codes, statuses)
    for code in codes:
        assert f"| {code} " in DOC, code
    for status in statuses:
        assert f"HTTP {numbers[status]}" in DOC, status
    assert "HTTP 403" in DOC  # a foreign Origin, refused by websockets' origins check
