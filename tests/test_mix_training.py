"""Training on `source=mix`: the tokens trained from each component (data/tokens/<component>),
validation per component (val/loss/<component>, val/bpb/<component>), and a finite mixture ending
a DDP run on the same step on both ranks.

Two `files` corpora, "plays" (weight 0.8) and "notes" (0.2), on real servers; the real
tokenizer; real Trainers. Expected figures are computed here from what the server serves, not
from what the trainer reports.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer

from streamgpt.data.packing import Encoder, TokenPacker

from .helpers.corpora import text
from .helpers.servers import Client

EOS = "<|endoftext|>"


def write_corpus(folder: Path, documents: int, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(documents):
        (folder / f"{folder.name}{i}.txt").write_text(text(rng, words))
    return folder


def component(sample_id: str) -> str:
    return sample_id.split("/", 1)[0]


def read_stream(url: str, consumer: dict, n: int) -> list[tuple[str, str]]:
    """What the server serves `consumer`: (id, text) in order, up to n or to the stream's end."""
    c = Client(url)
    c.handshake(consumer)
    out: list[tuple[str, str]] = []
    try:
        while len(out) < n:
            payload = c.data(64)["payload"]
            if payload == ["terminate"]:
                break
            out += [(s["sample_id"], next(iter(s["inputs"].values()))) for s in payload]
    finally:
        c.close()
    return out


def tokens_by_component(samples: list[tuple[str, str]], tokenizer: Tokenizer, n: int) -> Counter:
    """The components of the first n tokens of a stream: every token is its sample's."""
    encode = Encoder(tokenizer, EOS, EOS)
    labels: list[str] = []
    for (sample_id, _), ids in zip(samples, encode([t for _, t in samples]), strict=True):
        labels += [component(sample_id)] * len(ids)
        if len(labels) >= n:
            break
    assert len(labels) >= n, "read more of the stream"
    return Counter(labels[:n])


# -- the packer ---------------------------------------------------------------------------------


def test_the_packer_gives_every_token_of_a_batch_to_its_sample_across_batches_and_a_resume():
    rng = random.Random(0)
    samples = [(f"{rng.choice(['plays', 'notes'])}/d{i}#0", rng.randint(1, 40)) for i in range(60)]
    labels = [component(s) for s, n in samples for _ in range(n)]
    packer = TokenPacker(2, 8)
    got: list[dict[str, int]] = []
    for i, (sample_id, n) in enumerate(samples):
        packer.add([sample_id], [list(range(n))])
        while packer.ready():
            got.append(packer.components())
            packer.pop()
        if i == 30:  # a checkpoint and a resume mid-sample, in a fresh packer
            packer = TokenPacker(2, 8, packer.state())
    assert len(got) > 10
    for b, counts in enumerate(got):
        assert counts == Counter(labels[16 * b : 16 * (b + 1)]), f"batch {b}"


def test_a_packer_state_saved_before_the_sample_in_progress_was_kept_still_loads():
    packer = TokenPacker(1, 4)
    packer.add(["plays/a#0", "notes/b#0"], [[1, 2, 3], [4, 5, 6, 7, 8, 9]])
    packer.pop()
    assert TokenPacker(1, 4, packer.state()).components() == {"notes": 4}
    old = {k: v for k, v in packer.state().items() if k != "current"}
    resumed = TokenPacker(1, 4, old)
    assert resumed.components() == {"": 4}, "whose tokens they are, the old state did not say"
    x, _, _ = resumed.pop()
    assert x.tolist() == [[5, 6, 7, 8]]
