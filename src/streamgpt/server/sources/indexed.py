"""What the indexed sources (shakespeare, files) share: from documents to an IndexedCorpus.

Every document is known at start-up, so an epoch is an exact permutation of them and an exact
number can be held out for validation. The source's config was checked by server/config.py.
"""

from __future__ import annotations

import logging
from typing import Any

from streamgpt.server.corpus import Chunking, IndexedCorpus, SampleEncoder, count_words

log = logging.getLogger("streamgpt.server")


def indexed_corpus(
    name: str,
    keys: list[str],
    texts: list[str],
    cfg: Any,
    chunking: Chunking,
    encoder: SampleEncoder,
    description: dict[str, Any],
) -> IndexedCorpus:
    """The corpus of a source's documents: short ones dropped, the validation split held out."""
    keys, texts = keep_documents(keys, texts, cfg.min_words, name)
    return IndexedCorpus(
        name,
        keys,
        texts,
        chunking=chunking,
        encoder=encoder,
        validation_docs=validation_count(cfg, len(keys), name),
        description=description,
    )


def validation_count(cfg: Any, n_docs: int, name: str) -> int:
    """Held-out documents for an indexed source: an exact count, or a rounded fraction."""
    if cfg.validation_docs is not None:
        return cfg.validation_docs
    fraction = cfg.validation_fraction or 0.0
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
