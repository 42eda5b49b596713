"""Data sources: each turns its config into a corpus the streams read.

`shakespeare` (embedded, the default) and `files` are indexed: every document is known at start-up
and an epoch is an exact permutation of them. `fineweb` streams a Hugging Face dataset that is too
large to index, dealt to consumers by data file.
"""

from __future__ import annotations

import logging
from typing import Any

from streamgpt.server.corpus import (
    Chunking,
    IndexedCorpus,
    SampleEncoder,
    ShardedCorpus,
    count_words,
)

log = logging.getLogger("streamgpt.server")

SOURCES = ("shakespeare", "files", "fineweb")


def validation_count(cfg: Any, n_docs: int, name: str) -> int:
    """Held-out documents for an indexed source: an exact count, or a rounded fraction."""
    if cfg.validation_docs is not None:
        if cfg.validation_docs < 0:
            raise ValueError(f"source.validation_docs must be >= 0, got {cfg.validation_docs}")
        return cfg.validation_docs
    fraction = cfg.validation_fraction or 0.0
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"source.validation_fraction must be in [0, 1), got {fraction}")
    count = min(round(fraction * n_docs), n_docs - 1)
    if fraction > 0 and count == 0:
        log.warning(
            "%s: validation split is empty: %.3g of %d documents rounds to 0; "
            "set source.validation_docs to hold some out",
            name,
            fraction,
            n_docs,
        )
    return count


def keep_documents(
    keys: list[str], texts: list[str], min_words: int, name: str
) -> tuple[list[str], list[str]]:
    """Drop empty documents and those under `min_words` words, saying how many went."""
    kept = [i for i, text in enumerate(texts) if count_words(text, min_words)]
    if len(kept) < len(keys):
        log.info(
            "%s: skipped %d of %d documents with fewer than %d words",
            name,
            len(keys) - len(kept),
            len(keys),
            max(min_words, 1),
        )
    if not kept:
        raise ValueError(f"{name}: no document has at least {max(min_words, 1)} words")
    return [keys[i] for i in kept], [texts[i] for i in kept]


def build_corpus(
    source: Any, chunking: Chunking, output_name: str = "text_output"
) -> IndexedCorpus | ShardedCorpus:
    encoder = SampleEncoder(output_name)
    if source.name == "shakespeare":
        from streamgpt.server.sources.shakespeare import load

        return load(source, chunking, encoder)
    if source.name == "files":
        from streamgpt.server.sources.files import load

        return load(source, chunking, encoder)
    if source.name == "fineweb":
        from streamgpt.server.sources.fineweb import load

        return load(source, chunking, encoder)
    raise ValueError(f"unknown source {source.name!r}; choose one of {list(SOURCES)}")
