"""streamgpt installed as a wheel (not editable, not from the checkout) serves from any directory:
`python -m streamgpt.server` finds its config inside the package, nothing needs the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from .helpers.servers import Client, ids

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]
LISTENING = re.compile(r"stream server listening on (ws://\S+)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the package is made of (the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("streamgpt-*.whl")
    return built


def test_the_wheel_holds_the_server_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "streamgpt/server/__main__.py",
        "streamgpt/server/conf/serve.yaml",
        "streamgpt/server/conf/source/shakespeare.yaml",
        "streamgpt/server/conf/source/files.yaml",
        "streamgpt/server/conf/source/fineweb.yaml",
        "streamgpt/server/conf/source/mix.yaml",
    }
    assert expected <= names, expected - names


def test_an_installed_wheel_serves_from_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    # The third-party packages from the test's environment; its .pth files (the editable
    # install of the checkout among them) are not read from PYTHONPATH.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import streamgpt; print(streamgpt.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the checkout

    corpus = elsewhere / "corpus.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(400)))
    server = subprocess.Popen(
        [python, "-m", "streamgpt.server", "port=0", "source=files", f"source.paths=[{corpus}]"],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, seen = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = LISTENING.search(line)
            url = match.group(1) if match else None
        assert url, "".join(seen)
        client = Client(url)
        client.handshake()
        reply = client.data(4)
        client.close()
        assert len(ids(reply)) == 4
        texts = [s["inputs"]["text_output"] for s in reply["payload"]]
        assert all(t.startswith("word") for t in texts), texts
    finally:
        server.terminate()
        server.wait(30)
