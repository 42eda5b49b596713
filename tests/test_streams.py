"""Streams at every position: exact resumption, configured ends, the validation-id guard."""

import pytest

from streamgpt.server.corpus import Chunking, IndexedCorpus, SampleEncoder
from streamgpt.server.streams import ConsumerSpec, CursorError, NothingLeft, open_stream

from .helpers.corpora import text


def small_indexed() -> IndexedCorpus:
    import random

    rng = random.Random(5)
    keys = [f"doc{i}" for i in range(9)]
    texts = [text(rng, rng.choice([3, 20, 45])) for _ in keys]
    return IndexedCorpus(
        "small",
        keys,
        texts,
        chunking=Chunking(words=10),
        encoder=SampleEncoder(),
        validation_docs=2,
        description={},
    )


@pytest.fixture(params=["indexed", "sharded"])
def corpus(request, fineweb):
    return small_indexed() if request.param == "indexed" else fineweb


def take(stream, n):
    out = []
    for _ in range(n):
        chunk = stream.next_chunk()
        out.append(None if chunk is None else chunk.sample_id)
    return out


@pytest.mark.parametrize("split", ["train", "validation"])
def test_resuming_from_every_cursor_continues_exactly(corpus, split):
    spec = ConsumerSpec(seed=9, index=1, count=3, split=split)
    stream = open_stream(corpus, spec)
    reference, cursors = [], []
    while stream.epoch < 2 and len(reference) < 400:
        chunk = stream.next_chunk()
        if chunk is None:
            break
        reference.append(chunk.sample_id)
        cursors.append(stream.cursor())
    assert reference
    for i, cursor in enumerate(cursors):
        resumed = open_stream(corpus, spec, cursor=cursor)
        want = reference[i + 1 : i + 11]
        assert take(resumed, len(want)) == want, f"diverged after sample {i}"


def test_max_samples_is_split_across_consumers_and_ends_each_stream(corpus):
    total = 0
    for k in range(3):
        stream = open_stream(corpus, ConsumerSpec(seed=0, index=k, count=3), max_samples=100)
        got = take(stream, 200)
        n = len([i for i in got if i is not None])
        assert got[n:] == [None] * (200 - n), "once ended, a stream stays ended"
        total += n
    assert total == 100


def test_a_cursor_is_checked_before_use(corpus):
    spec = ConsumerSpec(seed=0, index=0, count=2)
    stream = open_stream(corpus, spec)
    take(stream, 3)
    cursor = stream.cursor()
    for bad, message in [
        ({**cursor, "v": 99}, "cursor version"),
        ({**cursor, "split": "validation"}, "split"),
        ({**cursor, "epoch": -1}, "'epoch' must be a non-negative integer"),
        ({**cursor, "n": "3"}, "'n' must be a non-negative integer"),
        ([cursor], "must be a JSON object"),
    ]:
        with pytest.raises(CursorError, match=message):
            open_stream(corpus, spec, cursor=bad)


def test_excluding_every_sample_is_an_error_not_a_hang():
    corpus = small_indexed()
    spec = ConsumerSpec(seed=0, index=0, count=1)
    everything = set(take(open_stream(corpus, spec, max_epochs=1), 500)) - {None}
    with pytest.raises(NothingLeft, match="every sample of an entire epoch"):
        open_stream(corpus, spec).payloads(4, frozenset(everything))
    samples, cursor = open_stream(corpus, spec).payloads(4, frozenset(list(everything)[:3]))
    assert len(samples) == 4 and cursor["n"] >= 4
