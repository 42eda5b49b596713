"""`source=mix`: a weighted mixture of sources, over the wire on real servers.

Two `files` corpora of different words ("plays" 0.8, "notes" 0.2, then 0.5/0.5 from a stage),
each component its own stream: shares, stages, exact resumes, consumers, the core stream, status,
validation and config errors.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from streamgpt.server.config import ServeConfig, validate
from streamgpt.server.corpus import Chunking
from streamgpt.server.sources import build_corpus

from .helpers.corpora import plays_and_notes, write_corpus
from .helpers.servers import ids

SWITCH = 3000


def mix_source(tmp: Path, staged: bool = True, **more) -> dict:
    plays, notes = tmp / "plays", tmp / "notes"
    if not plays.exists():
        write_corpus(plays, 40, seed=1)
        write_corpus(notes, 25, seed=2)
    stages = [{"from_sample": SWITCH, "weights": {"plays": 0.5, "notes": 0.5}}] if staged else []
    source = plays_and_notes(plays, notes, validation=(2, 3), stages=stages)
    return OmegaConf.merge(source, more)


def serve_config(source) -> object:
    cfg = OmegaConf.merge(OmegaConf.structured(ServeConfig), {"source": source})
    cfg.chunk.words = 16
    return cfg


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    cfg = serve_config(mix_source(tmp_path_factory.mktemp("mix")))
    validate(cfg)
    return build_corpus(cfg.source, Chunking(words=16))


def consumer(k, count, **more):
    return {"rank": k, "world_size": count, "seed": 3, **more}


def read(c, n, batch=500) -> tuple[list[str], list[dict]]:
    out, cursors = [], []
    while len(out) < n:
        reply = c.data(min(batch, n - len(out)))
        out += ids(reply)
        cursors.append(reply["cursor"])
    return out, cursors


def shares(sample_ids: list[str]) -> dict[str, float]:
    counts = Counter(i.split("/", 1)[0] for i in sample_ids)
    return {name: counts[name] / len(sample_ids) for name in ("plays", "notes")}


def test_shares_follow_the_weights_and_switch_at_the_stage(serve, client, mixture):
    c = client(serve(mixture).url, consumer(0, 1))
    got, _ = read(c, SWITCH + 10_000)
    before, after = shares(got[:SWITCH]), shares(got[SWITCH:])
    assert abs(before["plays"] - 0.8) < 0.01 and abs(before["notes"] - 0.2) < 0.01
    assert abs(after["plays"] - 0.5) < 0.01 and abs(after["notes"] - 0.5) < 0.01
    # At every prefix, not only on average: within two samples of the targets.
    plays = 0
    for t, sample_id in enumerate(got[:SWITCH], start=1):
        plays += sample_id.startswith("plays/")
        assert abs(plays - 0.8 * t) <= 2, f"sample {t}"
    assert shares(got[SWITCH : SWITCH + 10])["notes"] >= 0.4, "the switch is at the sample"


def test_without_stages_shares_hold_over_ten_thousand_samples(serve, client, tmp_path):
    cfg = serve_config(mix_source(tmp_path, staged=False))
    corpus = build_corpus(cfg.source, Chunking(words=16))
    got, _ = read(client(serve(corpus).url, consumer(0, 1)), 10_000)
    assert abs(shares(got)["plays"] - 0.8) < 0.01


def test_a_resume_from_any_cursor_is_exact_across_the_switch(serve, client, mixture):
    server = serve(mixture)
    hello = consumer(1, 2)
    rng = random.Random(0)
    c = client(server.url, hello)
    flat, cuts = [], []
    while len(flat) < SWITCH + 800:
        reply = c.data(rng.choice([1, 37, 200]))
        flat += ids(reply)
        cuts.append((len(flat), reply["cursor"]))
    assert set(cuts[-1][1]["parts"]) == {"plays", "notes"}
    crossing = [cut for cut in cuts if SWITCH - 250 < cut[0] < SWITCH]
    for done, cursor in [*rng.sample(cuts[:-1], 4), *crossing[-2:]]:
        resumed = client(server.url, {**hello, "cursor": cursor})
        want = flat[done : done + 600]
        assert read(resumed, len(want), batch=97)[0] == want, f"resume after {done} diverged"


def test_consumers_get_disjoint_deterministic_mixtures(serve, client, mixture):
    server = serve(mixture)
    first = [read(client(server.url, consumer(k, 2)), 600)[0] for k in range(2)]
    again = [read(client(server.url, consumer(k, 2)), 600, batch=7)[0] for k in range(2)]
    assert first == again, "the same consumer gets the same mixture, whatever the batch sizes"
    epoch0 = [set(s[:100]) for s in first]
    assert not epoch0[0] & epoch0[1], "consumers share no sample"
    for stream in first:
        assert abs(shares(stream[:500])["plays"] - 0.8) < 0.02


def test_a_core_client_receives_the_mixture(serve, client, mixture):
    c = client(serve(mixture).url)  # no consumer: the shared stream of EIR's core protocol
    got = []
    for _ in range(20):
        got += ids(c.data(10))
    assert {i.split("/", 1)[0] for i in got} == {"plays", "notes"}
    assert 0.75 <= shares(got)["plays"] <= 0.85


def test_status_reports_the_composition(serve, client, mixture):
    server = serve(mixture)
    c = client(server.url)

    def composition() -> dict:
        return c.ask({"type": "status", "payload": {}})["payload"]["mixture"]

    before = composition()
    assert (before["stage"], before["from_sample"]) == (0, 0)
    assert {n: p["weight"] for n, p in before["components"].items()} == {"plays": 0.8, "notes": 0.2}
    read(c, SWITCH + 20, batch=1000)
    mix = composition()
    assert (mix["stage"], mix["from_sample"]) == (1, SWITCH)
    assert {n: p["weight"] for n, p in mix["components"].items()} == {"plays": 0.5, "notes": 0.5}
    served = {
        n: p["samples_served"] - before["components"][n]["samples_served"]
        for n, p in mix["components"].items()
    }
    assert served == {"plays": 0.8 * SWITCH + 10, "notes": 0.2 * SWITCH + 10}
    status = c.ask({"type": "status", "payload": {}})["payload"]
    assert status["corpus"]["source"] == "mix"
    assert set(status["corpus"]["components"]) == {"plays", "notes"}


def test_validation_holds_out_each_components_documents_with_prefixed_ids(serve, client, mixture):
    server = serve(mixture)
    c = client(server.url, {"split": "validation"})
    held = read_to_end(c)
    documents = Counter(i.split("#")[0].split("/")[0] for i in set(i.split("#")[0] for i in held))
    assert documents == {"plays": 2, "notes": 3}, "each component's own held-out documents"
    first_notes = next(n for n, i in enumerate(held) if i.startswith("notes/"))
    assert all(i.startswith("plays/") for i in held[:first_notes]), "one split after the other"
    training = set(read(client(server.url, consumer(0, 1)), 3000)[0])
    assert training.isdisjoint(held)


STEP_STAGES = [{"from_step": 40, "weights": {"plays": 0.2, "notes": 0.8}}]


@pytest.fixture(scope="module")
def step_mixture(tmp_path_factory):
    cfg = serve_config(mix_source(tmp_path_factory.mktemp("steps"), stages=STEP_STAGES))
    validate(cfg)
    return build_corpus(cfg.source, Chunking(words=16))


def test_a_step_stage_starts_where_the_handshake_asks_and_resumes_exactly(
    serve, client, step_mixture
):
    server = serve(step_mixture)
    hello = consumer(1, 2)
    before, cursors = read(client(server.url, hello), 1000, batch=100)
    assert abs(shares(before)["plays"] - 0.8) < 0.01
    assert cursors[-1]["switches"] == []
    unasked, _ = read(client(server.url, {**hello, "cursor": cursors[-1]}), 2000)
    assert abs(shares(unasked)["plays"] - 0.8) < 0.01, "without `stage`, the cursor's stage"
    rng = random.Random(0)
    c = client(server.url, {**hello, "cursor": cursors[-1], "stage": 1})
    flat, cuts = [], []
    while len(flat) < 3000:
        reply = c.data(rng.choice([1, 37, 200]))
        flat += ids(reply)
        cuts.append((len(flat), reply["cursor"]))
    assert abs(shares(flat)["notes"] - 0.8) < 0.01 and shares(flat[:10])["notes"] >= 0.7
    notes = 0
    for t, sample_id in enumerate(flat, start=1):
        notes += sample_id.startswith("notes/")
        assert abs(notes - 0.8 * t) <= 2, f"sample {t} after the switch"
    assert cuts[-1][1]["switches"] == [[1, 1000]]
    for done, cursor in rng.sample(cuts[:-1], 4):
        for again in ({}, {"stage": 1}):  # the cursor's stage, asked or not
            resumed = client(server.url, {**hello, "cursor": cursor, **again})
            want = flat[done : done + 500]
            assert read(resumed, len(want), batch=97)[0] == want, f"resume after {done} diverged"


def test_status_reports_the_stages_that_start_from_a_step(serve, client, step_mixture):
    c = client(serve(step_mixture).url)
    status = c.ask({"type": "status", "payload": {}})["payload"]
    stages = [{"from_step": 0, "weights": {"plays": 0.8, "notes": 0.2}}, *STEP_STAGES]
    assert status["corpus"]["stages"] == status["mixture"]["stages"] == stages
    assert (status["mixture"]["stage"], status["mixture"]["from_sample"]) == (0, 0)


@pytest.mark.parametrize(
    ("stage", "cursor_stage", "message"),
    [
        (0, 1, "consumer.stage 0 is before the cursor's stage 1"),
        (2, 0, "consumer.stage must be a stage in 0 … 1, got 2"),
        (-1, 0, "consumer.stage must be null or an integer"),
    ],
)
def test_a_stage_the_stream_cannot_take_fails_the_handshake(
    serve, client, step_mixture, stage, cursor_stage, message
):
    server = serve(step_mixture)
    _, cursors = read(client(server.url, {**consumer(0, 1), "stage": cursor_stage}), 10)
    c = client(server.url, handshake=False)
    hello = {**consumer(0, 1), "cursor": cursors[-1], "stage": stage}
    reply = c.ask({"type": "handshake", "version": "1.0", "consumer": hello})
    assert reply["type"] == "error" and message in reply["payload"]["message"]


def test_a_stage_is_refused_by_a_server_without_step_stages(serve, client, mixture):
    c = client(serve(mixture).url, handshake=False)
    reply = c.ask({"type": "handshake", "version": "1.0", "consumer": {"stage": 1}})
    assert reply["type"] == "error" and "from_step" in reply["payload"]["message"]


def read_to_end(c) -> list[str]:
    out = []
    while (reply := c.data(64))["payload"] != ["terminate"]:
        out += ids(reply)
    return out


def test_max_epochs_ends_when_a_component_would_repeat(serve, client, mixture):
    server = serve(mixture, max_epochs=1)
    c = client(server.url, consumer(0, 1))
    got = read_to_end(c)
    assert len(got) == len(set(got)), "no sample twice within one epoch"
    notes = [i for i in got if i.startswith("notes/")]
    whole = read_to_end(client(server.url, {"split": "validation"}))
    assert notes and not set(notes) & set(whole)
    last = c.data(5)
    assert last["payload"] == ["terminate"] and last["cursor"]["epoch"] == 1
    resumed = client(server.url, {**consumer(0, 1), "cursor": last["cursor"]})
    assert resumed.data(5)["payload"] == ["terminate"], "the end holds from its cursor"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"components": {"notes": {"weight": 0}}}, "source.components.notes.weight must be"),
        ({"components": {"notes": {"wieght": 1}}}, "source.components.notes.wieght"),
        ({"components": {"plays": {"source": {"name": "mix"}}}}, "a mixture is not a component"),
        ({"components": {"plays": {"source": {"pathz": []}}}}, "components.plays.source.pathz"),
        ({"components": {"a/b": {"source": {"name": "shakespeare"}, "weight": 1}}}, "a/b"),
        ({"components": {"extra": {"source": {"name": "shakespeare"}}}}, "extra.weight must be"),
        ({"stages": [{"from_sample": 0, "weights": {"plays": 1, "notes": 1}}]}, "from_sample"),
        ({"stages": [{"from_sample": 5, "weights": {"plays": 1}}]}, "stages[0].weights"),
        (
            {
                "stages": [
                    {"from_sample": 9, "weights": {"plays": 1, "notes": 1}},
                    {"from_sample": 5, "weights": {"plays": 1, "notes": 1}},
                ]
            },
            "stages[1].from_sample must be greater than 9",
        ),
        (
            {"stages": [{"from_sample": 5, "from_step": 5, "weights": {"plays": 1, "notes": 1}}]},
            "stages[0] must be given exactly one of from_sample and from_step",
        ),
        ({"stages": [{"weights": {"plays": 1, "notes": 1}}]}, "stages[0] must be given exactly"),
        (
            {"stages": [{"from_step": 0, "weights": {"plays": 1, "notes": 1}}]},
            "stages[0].from_step must be greater than 0",
        ),
        (
            {
                "stages": [
                    {"from_step": 9, "weights": {"plays": 1, "notes": 1}},
                    {"from_sample": 50, "weights": {"plays": 1, "notes": 1}},
                ]
            },
            "stages[1] must be given from_step like stages[0]",
        ),
        (
            {
                "stages": [
                    {"from_step": 9, "weights": {"plays": 1, "notes": 1}},
                    {"from_step": 9, "weights": {"plays": 2, "notes": 1}},
                ]
            },
            "stages[1].from_step must be greater than 9",
        ),
    ],
)
def test_a_bad_mixture_is_refused_in_one_line_naming_the_key(tmp_path, change, message):
    cfg = serve_config(mix_source(tmp_path, **change))
    with pytest.raises(ValueError, match=r".") as refused:
        validate(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)
