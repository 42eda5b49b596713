"""Your own corpus: folders, files or globs of `.txt`, `.jsonl` and `.parquet`.

`.txt`: one document per file. `.jsonl`: one document per line, text in `text_field`.
`.parquet`: one document per row, text in the `text_field` column. Documents are keyed by their
path relative to the folder or glob root they were found under (plus `:line` or `:row`), or by
`id_field` when the data has one, so keys and sample ids survive moving the corpus.
The corpus is read into memory at start-up; for corpora larger than memory use the `fineweb`
source, which streams any Hugging Face dataset (local parquet files included).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import orjson

from streamgpt.server.corpus import Chunking, IndexedCorpus, SampleEncoder
from streamgpt.server.sources.indexed import indexed_corpus

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _root_of(pattern: str) -> Path:
    """The folder a glob's matches are keyed relative to: its part before the first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def find_files(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, key prefix) for every corpus file the paths name, in a stable order."""
    if not paths:
        raise ValueError(
            "source.paths is empty: give folders, files or globs of .txt/.jsonl/.parquet"
        )
    found: dict[Path, str] = {}
    for raw in paths:
        given = os.path.expanduser(raw)
        if Path(given).is_dir():
            root = Path(given)
            matches = [p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
        elif glob.has_magic(given):
            root = _root_of(given)
            matches = [Path(p) for p in glob.glob(given, recursive=True)]
            matches = [p for p in matches if p.is_file() and p.suffix in SUFFIXES]
        elif Path(given).is_file():
            root = Path(given).parent
            matches = [Path(given)]
            if matches[0].suffix not in SUFFIXES:
                raise ValueError(
                    f"{given}: unsupported file type; the files source reads {SUFFIXES}"
                )
        else:
            raise ValueError(
                f"source.paths: {raw!r} is not a folder, file or glob that matches files"
            )
        if not matches:
            raise ValueError(f"source.paths: {raw!r} matched no {'/'.join(SUFFIXES)} files")
        for p in matches:
            found.setdefault(p.resolve(), p.relative_to(root).as_posix())
    return sorted(found.items(), key=lambda item: item[1])


def _read_jsonl(path: Path, prefix: str, cfg: Any) -> tuple[list[str], list[str]]:
    keys, texts = [], []
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(cfg.text_field), str):
                raise ValueError(
                    f"{where}: no string field {cfg.text_field!r} (set source.text_field to the "
                    "field that holds the text)"
                )
            texts.append(row[cfg.text_field])
            keys.append(
                _key(row.get(cfg.id_field) if cfg.id_field else None, where, prefix, line_no, cfg)
            )
    return keys, texts


def _key(value: Any, where: str, prefix: str, index: int, cfg: Any) -> str:
    if cfg.id_field is None:
        return f"{prefix}:{index}"
    if value is None or isinstance(value, (dict, list)):
        raise ValueError(f"{where}: no usable id in field {cfg.id_field!r} (source.id_field)")
    return str(value)


def _read_parquet(path: Path, prefix: str, cfg: Any) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field else [])
    try:
        table = pq.read_table(path, columns=columns)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot read columns {columns} ({e}); set source.text_field/source.id_field"
        ) from None
    texts = table.column(cfg.text_field).to_pylist()
    ids = table.column(cfg.id_field).to_pylist() if cfg.id_field else [None] * len(texts)
    keys = []
    for row, (text, value) in enumerate(zip(texts, ids, strict=True)):
        if not isinstance(text, str):
            raise ValueError(f"{path} row {row}: column {cfg.text_field!r} is not a string")
        keys.append(_key(value, f"{path} row {row}", prefix, row, cfg))
    return keys, texts


def read_documents(cfg: Any) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    texts: list[str] = []
    for path, prefix in find_files(list(cfg.paths)):
        if path.suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e})") from None
            keys.append(prefix)
            texts.append(text)
        else:
            reader = _read_jsonl if path.suffix == ".jsonl" else _read_parquet
            more_keys, more_texts = reader(path, prefix, cfg)
            keys += more_keys
            texts += more_texts
    return keys, texts


def load(cfg: Any, chunking: Chunking, encoder: SampleEncoder) -> IndexedCorpus:
    keys, texts = read_documents(cfg)
    description = {"source": "files", "paths": list(cfg.paths)}
    return indexed_corpus("files", keys, texts, cfg, chunking, encoder, description)
