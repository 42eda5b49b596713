"""`python -m streamgpt.server ...` (and scripts/serve.py): the Hydra app, run as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from streamgpt.server.process import ServerProcess

from .helpers.corpora import write_user_corpus
from .helpers.servers import Client, ids

# The thin wrapper users run from a checkout (ServerProcess runs `python -m streamgpt.server`).
SERVE = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "serve.py")]


def test_serve_composes_a_source_and_serves_until_sigterm(tmp_path, client):
    write_user_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    overrides = [
        "source=files",
        f"source.paths=[{tmp_path / 'corpus'}]",
        "chunk.words=32",
        f"hydra.run.dir={run_dir}",
    ]
    server = ServerProcess(overrides).start()
    try:
        c = client(server.url)
        status = c.ask({"type": "status", "payload": {}})["payload"]
        assert status["corpus"]["source"] == "files" and status["corpus"]["documents"] == 12
        assert len(ids(c.data(8))) == 8
        c.close()
    finally:
        code = server.stop()
    assert code == 0, "".join(server.tail)
    assert (run_dir / ".hydra" / "config.yaml").exists()
    log = (run_dir / "serve.log").read_text()
    assert "connection #1 from 127.0.0.1" in log and "core (shared stream)" in log


def test_the_token_comes_from_the_environment_and_is_never_logged(tmp_path):
    run_dir = tmp_path / "run"
    env = {"STREAMGPT_TOKEN": "tok-123456"}
    with ServerProcess([f"hydra.run.dir={run_dir}"], env=env) as server:
        with pytest.raises(InvalidStatus):
            Client(server.url)
        ok = Client(server.url, additional_headers={"Authorization": "Bearer tok-123456"})
        ok.handshake()
        ok.close()
    assert "tok-123456" not in "".join(server.tail)
    assert "tok-123456" not in (run_dir / ".hydra" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("limits.max_conections=3", "max_conections"),
        ("port=abc", "port"),
        ("source=nope", "nope"),
        ("source.validation_docs=many", "validation_docs"),
        ("chunk.words=0", "chunk.words must be a positive integer"),
        ("source=files", "source.paths"),
    ],
)
def test_a_bad_option_fails_at_start_naming_it(tmp_path, override, names):
    done = subprocess.run(
        [*SERVE, override, "port=0", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert names in done.stderr + done.stdout
