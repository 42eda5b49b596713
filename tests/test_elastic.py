"""Elastic determinism (data.stream.elastic): the same sequences in every step whatever the number
of consumers (ranks x DataLoader workers, with the accumulation that keeps the global batch), from
the start and across a resume on another number of them."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from pathlib import Path

import pytest

from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.data.config import ElasticConfig
from streamgpt.data.elastic import Layout
from streamgpt.server.process import ServerProcess

from .helpers.corpora import small_corpus
from .helpers.runs import batches, train
from .helpers.servers import Client, ids, stream_cfg

ELASTIC = ["data.stream.elastic.streams=2", "data.stream.elastic.phases=2"]
# Global batch 16 sequences (batch_size 8) for each number of consumers K.
CONSUMERS = {
    1: ["trainer.accumulate_grad_batches=2"],  # 1 rank, no worker: 2 micro-batches a step
    2: ["data.stream.num_workers=2", "trainer.accumulate_grad_batches=2"],  # 1 rank x 2 workers
    4: [
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.stream.num_workers=2",
    ],  # 2 ranks x 2 workers
}
RANKS = {1: 1, 2: 1, 4: 2}
STEPS = 50
RESUME_AT = 20


def step_sets(run: Path, ranks: int) -> dict[int, list[str]]:
    """Each step's sequences (hashes of their tokens) over all ranks and micro-batches, sorted."""
    steps: dict[int, list[str]] = defaultdict(list)
    for rank in range(ranks):
        for line in batches(run, rank).values():
            steps[line["step"]] += line["rows"]
    return {s: sorted(rows) for s, rows in steps.items()}


def unit_ids(*parts: tuple[Path, int, int]) -> dict[str, list[str]]:
    """Per canonical stream, the sample ids it trained, in order: (run, ranks, from step)."""
    out: dict[str, list[str]] = defaultdict(list)
    for run, ranks, first in parts:
        lines = [b for r in range(ranks) for b in batches(run, r).values() if b["step"] >= first]
        for line in sorted(lines, key=lambda b: b["step"]):
            for unit, trained in line["units"].items():
                out[unit] += trained
    return out


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory):
    """A K = 4 run of 50 steps, K = 1 and 2 runs of the same, and the K = 4 run resumed from its
    step-20 checkpoint with K = 2 and with K = 1; what each canonical stream is served; and every
    training sample id (the corpus files' less the server's validation split)."""
    tmp = tmp_path_factory.mktemp("elastic")
    words = small_corpus(tmp / "corpus")
    every_id = {f"{key}#{i}" for key, n in words.items() for i in range(math.ceil(n / 100))}
    server_options = [
        "source=files",
        f"source.paths=[{tmp / 'corpus'}]",
        "source.validation_fraction=0.1",
        "chunk.words=100",
        f"hydra.run.dir={tmp / 'server'}",
    ]
    common = [
        *ELASTIC,
        f"trainer.max_steps={STEPS}",
        "trainer.val_every=10",
        f"callbacks.checkpoint_every={RESUME_AT}",
        "callbacks.n_saved=3",
        "callbacks.sample_every=0",
    ]
    runs: dict[str, Path] = {}
    with ServerProcess(server_options) as server:
        url = f"data.stream.url={server.url}"
        for k in (4, 1, 2):
            runs[f"K{k}"] = tmp / f"K{k}"
            done = train(runs[f"K{k}"], url, *common, *CONSUMERS[k])
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (checkpoint,) = (runs["K4"] / "checkpoints").glob(f"step={RESUME_AT:07d}-*.ckpt")
        for k in (2, 1):
            runs[f"K4->K{k}"] = tmp / f"K4-K{k}"
            done = train(
                runs[f"K4->K{k}"], url, *common, *CONSUMERS[k], f"ckpt_path='{checkpoint}'"
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # Each canonical stream (the server's consumer u of 4), read one sample at a time up to
        # the end of its first epoch.
        served: dict[str, list[str]] = {}
        for unit in range(4):
            client = Client(server.url)
            client.handshake({"rank": unit, "world_size": 4, "worker": 0, "num_workers": 1})
            stream: list[str] = []
            while (reply := client.data(1))["cursor"]["epoch"] == 0:
                stream += ids(reply)
            client.close()
            served[str(unit)] = stream
        client = Client(server.url)
        client.handshake({"rank": 0, "world_size": 1, "seed": 0, "split": "validation"})
        held_out: list[str] = []
        while got := ids(client.data(16)):
            held_out += got
        client.close()
    assert held_out and set(held_out) < every_id
    return runs, served, every_id - set(held_out)


@pytest.mark.slow
def test_one_two_and_four_consumers_train_the_same_sequences_in_every_step(elastic_runs):
    runs, _, _ = elastic_runs
    reference = step_sets(runs["K4"], ranks=2)
    assert sorted(reference) == list(range(STEPS))
    assert all(len(rows) == 16 for rows in reference.values())
    assert len({tuple(rows) for rows in reference.values()}) == STEPS, "steps differ"
    for k in (1, 2):
        got = step_sets(runs[f"K{k}"], RANKS[k])
        assert got == reference, f"K={k}"


@pytest.mark.slow
def test_a_run_resumed_on_fewer_consumers_trains_what_the_uninterrupted_run_did(elastic_runs):
    runs, _, _ = elastic_runs
    reference = step_sets(runs["K4"], ranks=2)
    for k in (2, 1):
        got = step_sets(runs[f"K4->K{k}"], RANKS[k])
        assert sorted(got) == list(range(RESUME_AT, STEPS)), f"K=4 -> K={k}"
        for step in got:
            assert got[step] == reference[step], f"K=4 -> K={k}, step {step}"


@pytest.mark.slow
def test_over_a_whole_epoch_no_sample_is_trained_twice_or_missed(elastic_runs):
    runs, served, every_id = elastic_runs
    # One epoch: the training documents of the files, each sample once.
    assert sorted(itertools.chain(*served.values())) == sorted(every_id)
    for name, parts in {
        "K=4": [(runs["K4"], 2, 0)],
        "K=4 -> K=2": [(runs["K4"], 2, 0), (runs["K4->K2"], 1, RESUME_AT)],
        "K=4 -> K=1": [(runs["K4"], 2, 0), (runs["K4->K1"], 1, RESUME_AT)],
    }.items():
        trained = unit_ids(*parts)
        assert sorted(trained) == sorted(served), name
        for unit, epoch in served.items():
            # Every stream is past its first epoch, trained from its start in order.
            assert len(trained[unit]) > len(epoch), (name, unit)
            assert trained[unit][: len(epoch)] == epoch, (name, unit)


@pytest.mark.parametrize(("streams", "phases"), [(4, 2), (8, 4), (2, 1)])
def test_every_topology_that_divides_the_canonical_streams_reads_each_once_a_step(streams, phases):
    global_batch = 8 * streams
    for ranks, accumulate, workers in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4)):
        layout = Layout(streams, phases, global_batch, ranks, accumulate, workers)
        if layout.problem():
            continue
        for first in (0, accumulate * 3):  # a fresh start, and a resume at step 3
            owner: dict[int, tuple[int, int]] = {}
            for rank, worker in itertools.product(range(ranks), range(workers)):
                for unit in layout.units_of_worker(rank, worker, first):
                    assert unit not in owner, "a canonical stream read by two consumers"
                    assert layout.rank_of(unit) == rank
                    owner[unit] = (rank, worker)
            for step in range(first // accumulate, first // accumulate + 2 * phases):
                used = []
                for rank, a in itertools.product(range(ranks), range(accumulate)):
                    i = step * accumulate + a
                    units = layout.units_of_micro_batch(rank, i)
                    assert len(units) * layout.rows == global_batch // (ranks * accumulate)
                    worker = (i - first) % workers  # the DataLoader's round robin
                    assert all(owner[u] == (rank, worker) for u in units)
                    used += units
                phase = step % phases
                assert sorted(used) == [phase * streams + c for c in range(streams)]


@pytest.mark.parametrize(
    ("ranks", "accumulate", "workers", "names"),
    [(3, 1, 1, "does not divide the 4 canonical"), (1, 1, 3, "workers per rank do not divide")],
)
def test_a_topology_that_cannot_read_the_streams_exactly_is_refused_naming_why(
    ranks, accumulate, workers, names
):
    layout = Layout(4, 2, 8 * ranks * accumulate, ranks, accumulate, workers)
    assert names in layout.problem()


@pytest.mark.slow
def test_a_finite_stream_ends_every_rank_on_the_same_step_whatever_the_consumers(tmp_path):
    small_corpus(tmp_path / "corpus")
    server_options = [
        "source=files",
        f"source.paths=[{tmp_path / 'corpus'}]",
        "source.validation_fraction=0",
        "chunk.words=100",
        "end.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'server'}",
    ]
    two_ranks = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    common = [
        *ELASTIC,
        "trainer.max_steps=100000",
        "data.stream.valid_size=0",
        "callbacks.sample_every=0",
        "callbacks.checkpoint_every=0",
    ]
    with ServerProcess(server_options) as server:
        url = f"data.stream.url={server.url}"
        ddp = train(tmp_path / "ddp", url, *common, *two_ranks)
        one = train(tmp_path / "one", url, *common, "trainer.accumulate_grad_batches=2")
    for done in (ddp, one):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "the server ended the stream" in done.stdout + done.stderr
    per_rank = [len(batches(tmp_path / "ddp", r)) for r in (0, 1)]
    assert per_rank[0] == per_rank[1] > 5, "both ranks stopped after the same step"
    # The step the data ends on is the canonical streams', not the consumers'.
    assert step_sets(tmp_path / "ddp", ranks=2) == step_sets(tmp_path / "one", ranks=1)


def test_a_checkpoint_whose_data_cannot_continue_exactly_is_refused_naming_the_setting(tmp_path):
    url = "ws://127.0.0.1:9/ws"  # never contacted: loading a state reads no stream
    canonical = ElasticConfig(streams=2, phases=2)
    elastic = StreamDataModule(stream_cfg(url, elastic=canonical), TokenizerConfig(), tmp_path)
    plain = StreamDataModule(stream_cfg(url), TokenizerConfig(), tmp_path)
    written = elastic.state_dict()
    assert written["version"] == 2 and written["elastic"]["global_batch"] == 4
    with pytest.raises(ValueError, match="read as per-consumer streams and this run asks for"):
        elastic.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="read as elastic streams"):
        plain.load_state_dict(written)
    bigger = StreamDataModule(
        stream_cfg(url, elastic=canonical, batch_size=8), TokenizerConfig(), tmp_path
    )
    with pytest.raises(ValueError, match="global_batch 4 -> 8"):
        bigger.load_state_dict(written)
    elastic.load_state_dict(written)  # the same canonical streams resume
