"""Chunking, sample encoding and the hash-based orders."""

import numpy as np
import orjson
import pytest

from streamgpt.server.corpus import (
    Chunking,
    IndexedCorpus,
    SampleEncoder,
    chunk_document,
    key_hashes,
    shuffle_order,
)

DOC = "  First line of verse,\n  and the second.\n\nA new   paragraph here: one two three four.\n"


def test_preserved_chunks_concatenate_back_to_the_document():
    chunking = Chunking(words=4, eot_marker="<|endoftext|>")
    chunks = chunking.split(DOC)
    assert "".join(chunks) == DOC.strip() + "<|endoftext|>"
    assert [len(c.replace("<|endoftext|>", "").split()) for c in chunks] == [4, 4, 4, 3]


def test_collapsed_chunks_are_single_spaced_words_as_eir_sends_them():
    chunks = Chunking(words=5, eot_marker="|", whitespace="collapse").split(DOC)
    assert chunks[0] == "First line of verse, and"
    assert " ".join(chunks).removesuffix("|") == " ".join(DOC.split())


def test_only_the_last_chunk_of_a_document_carries_the_end_marker():
    chunks = Chunking(words=3).split(DOC)
    assert chunks[-1].endswith("<|endoftext|>")
    assert not any("<|endoftext|>" in c for c in chunks[:-1])
    assert Chunking().split("   \n ") == []


def test_sample_is_exactly_the_three_keys_eir_accepts():
    payload = SampleEncoder("text_output").encode('id"1', 'a "quoted"\ntext \u00e9')
    sample = orjson.loads(payload)
    assert sample == {
        "inputs": {"text_output": 'a "quoted"\ntext \u00e9'},
        "target_labels": {"text_output": {"text_output": 'a "quoted"\ntext \u00e9'}},
        "sample_id": 'id"1',
    }


def test_sample_ids_derive_from_document_and_chunk_only():
    enc = SampleEncoder()
    a = chunk_document("hamlet", DOC, Chunking(words=4), enc)
    b = chunk_document("hamlet", DOC, Chunking(words=4), enc)
    assert [c.sample_id for c in a] == ["hamlet#0", "hamlet#1", "hamlet#2", "hamlet#3"]
    assert a == b


def test_orders_are_permutations_that_change_with_seed_and_epoch():
    hashes = key_hashes([f"doc{i}" for i in range(50)])
    base = shuffle_order(hashes, seed=0, epoch=0)
    assert sorted(base.tolist()) == list(range(50))
    assert np.array_equal(base, shuffle_order(hashes, seed=0, epoch=0))
    assert not np.array_equal(base, shuffle_order(hashes, seed=0, epoch=1))
    assert not np.array_equal(base, shuffle_order(hashes, seed=1, epoch=0))


def test_orders_are_pinned_across_machines_and_library_versions():
    # The order is defined by blake2b and splitmix64 alone; this pins it, so a change that would
    # silently alter every user's data order (and invalidate their cursors) fails here.
    hashes = key_hashes([f"doc{i}" for i in range(8)])
    assert shuffle_order(hashes, seed=0, epoch=0).tolist() == [3, 7, 5, 0, 4, 1, 6, 2]


def test_indexed_corpus_holds_out_the_lowest_hashes_and_refuses_duplicates():
    keys = [f"d{i}" for i in range(10)]
    corpus = IndexedCorpus(
        "t",
        keys,
        ["x y"] * 10,
        chunking=Chunking(),
        encoder=SampleEncoder(),
        validation_docs=3,
        description={},
    )
    hashes = key_hashes(keys)
    assert sorted(corpus.validation_ids.tolist()) == sorted(np.argsort(hashes)[:3].tolist())
    assert set(corpus.train_ids.tolist()).isdisjoint(corpus.validation_ids.tolist())
    with pytest.raises(ValueError, match="appears twice"):
        IndexedCorpus(
            "t",
            ["a", "a"],
            ["x", "y"],
            chunking=Chunking(),
            encoder=SampleEncoder(),
            validation_docs=0,
            description={},
        )
    with pytest.raises(ValueError, match="at least one document must remain"):
        IndexedCorpus(
            "t",
            ["a", "b"],
            ["x", "y"],
            chunking=Chunking(),
            encoder=SampleEncoder(),
            validation_docs=2,
            description={},
        )
