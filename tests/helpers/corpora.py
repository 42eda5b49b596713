"""Small corpora written on the fly: FineWeb-format parquet files, and mixed user corpora."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

_VOCABULARY = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "river light stone market engine winter garden letter signal harbour mountain"
)
WORDS = _VOCABULARY.split()


def text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.1:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines).strip()


def write_corpus(folder: Path, documents: int, seed: int) -> Path:
    """A folder of .txt documents named after it (`plays/plays0.txt`), of 30 to 150 words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(documents):
        (folder / f"{folder.name}{i}.txt").write_text(text(rng, rng.choice([30, 80, 150])))
    return folder


def write_fineweb_parquet(
    folder: Path, files: int, docs_per_file: int, seed: int = 0
) -> list[Path]:
    """Parquet files with FineWeb's columns, several row groups each, some pages under 20 words."""
    rng = random.Random(seed)
    paths = []
    for f in range(files):
        rows = []
        for d in range(docs_per_file):
            n = rng.choice([5, 12, 40, 90, 150, 300])
            body = text(rng, n)
            rows.append(
                {
                    "text": body,
                    "id": f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128))}>",
                    "dump": "CC-MAIN-2024-10",
                    "url": f"https://example.org/{f}/{d}",
                    "date": "2024-02-21T08:00:00Z",
                    "file_path": f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/{f}.warc.gz",
                    "language": "en",
                    "language_score": 0.9 + rng.random() / 10,
                    "token_count": len(body.split()) * 4 // 3,
                }
            )
        path = folder / f"{f:03d}_00000.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=40)
        paths.append(path)
    return paths


def write_user_corpus(folder: Path, seed: int = 1) -> dict[str, int]:
    """A folder with .txt, .jsonl and .parquet documents; returns documents per file."""
    rng = random.Random(seed)
    (folder / "books").mkdir(parents=True)
    counts = {}
    for i in range(3):
        (folder / "books" / f"book{i}.txt").write_text(text(rng, 200 + 50 * i))
        counts[f"books/book{i}.txt"] = 1
    with (folder / "notes.jsonl").open("wb") as f:
        for i in range(5):
            f.write(orjson.dumps({"text": text(rng, 30 + i), "meta": i}) + b"\n")
    counts["notes.jsonl"] = 5
    table = pa.Table.from_pylist([{"text": text(rng, 60), "n": i} for i in range(4)])
    pq.write_table(table, folder / "pages.parquet")
    counts["pages.parquet"] = 4
    return counts


def small_corpus(folder: Path, documents: int = 24) -> dict[str, int]:
    """Text files of 150-450 words; returns each document's word count."""
    folder.mkdir()
    words = {}
    for d in range(documents):
        n = 150 + 13 * d
        body = " ".join(f"w{d}x{i % 37}" for i in range(n))
        (folder / f"doc{d:02d}.txt").write_text(body)
        words[f"doc{d:02d}.txt"] = n
    return words


def plays_and_notes(plays: Path, notes: Path, validation: tuple[int, int], stages=()) -> dict:
    """A `mix` source of two `files` corpora, plays (weight 0.8) and notes (0.2), holding out
    `validation` documents of each."""
    weights = {"plays": 0.8, "notes": 0.2}
    return {
        "name": "mix",
        "components": {
            name: {
                "source": {"name": "files", "paths": [str(path)], "validation_docs": held_out},
                "weight": weights[name],
            }
            for name, path, held_out in zip(weights, (plays, notes), validation, strict=True)
        },
        "stages": list(stages),
    }
