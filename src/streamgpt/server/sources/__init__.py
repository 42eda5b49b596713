"""Data sources: each turns its config into a corpus the streams read.

`shakespeare` (embedded, the default) and `files` are indexed (indexed.py): every document is
known at start-up and an epoch is an exact permutation of them. `fineweb` streams a Hugging Face
dataset that is too large to index, dealt to consumers by data file. `mix` mixes the others by
weight (mix.py, server/mixture.py).
"""

from __future__ import annotations

from typing import Any

from streamgpt.server.corpus import Chunking, IndexedCorpus, SampleEncoder, ShardedCorpus
from streamgpt.server.mixture import MixCorpus
from streamgpt.server.sources import files, fineweb, mix, shakespeare

LOADERS = {"shakespeare": shakespeare.load, "files": files.load, "fineweb": fineweb.load}
SOURCES = (*LOADERS, "mix")


def build_corpus(
    source: Any, chunking: Chunking, output_name: str = "text_output"
) -> IndexedCorpus | ShardedCorpus | MixCorpus:
    """The corpus of a source config (checked by server/config.py: its name is one of SOURCES)."""
    if source.name == "mix":
        return mix.load(source, chunking, SampleEncoder(output_name), LOADERS)
    return LOADERS[source.name](source, chunking, SampleEncoder(output_name))
