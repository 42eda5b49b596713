"""`python train.py` on the paths the other tests do not take: DDP on two CPU processes (the
node's embedded server found by its URL file, a kill and `resume=auto`), a finite stream that the
server ends with `terminate`, and a server that wants a bearer token."""

from __future__ import annotations

import math
import os
import signal

import pytest

from streamgpt.server.process import ServerProcess

from .helpers.corpora import small_corpus
from .helpers.runs import batches, output, processes_using, start, train, wait_for
from .helpers.servers import Client, ids

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
DDP_STEPS = [
    "trainer.max_steps=24",
    "trainer.val_every=8",
    "callbacks.checkpoint_every=8",
    "callbacks.sample_every=8",
]


@pytest.mark.slow
def test_ddp_through_train_py_killed_and_resumed_trains_the_batches_of_an_undisturbed_run(
    tmp_path,
):
    reference = tmp_path / "reference"
    done = train(reference, *DDP, *DDP_STEPS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    want = [batches(reference, r) for r in (0, 1)]
    assert sorted(want[0]) == sorted(want[1]) == list(range(1, 25))
    ids0 = {i for b in want[0].values() for i in b["ids"]}
    ids1 = {i for b in want[1].values() for i in b["ids"]}
    assert ids0 and ids1 and not ids0 & ids1, "the ranks read disjoint samples"

    run = tmp_path / "run"
    proc = start(run, *DDP, *DDP_STEPS, start_new_session=True)
    wait_for(lambda: list((run / "checkpoints").glob("step=0000008*.ckpt")), proc, "step 8")
    wait_for(lambda: len(batches(run)) >= 11, proc, "step 11")
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks at once, as when a node fails
    assert proc.wait() == -signal.SIGKILL
    assert len(batches(run)) < 24, "killed mid-run"
    wait_for(lambda: not processes_using(run), proc=None, what="the server's end", timeout=30)

    done = train(run, *DDP, *DDP_STEPS, "resume=auto")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resume=auto: continuing from" in (run / "train.log").read_text()
    for rank in (0, 1):
        got = batches(run, rank)
        assert sorted(got) == list(range(1, 25))
        for b in got:  # every consumer's state came back through the all-gather
            assert (got[b]["ids"], got[b]["x"]) == (want[rank][b]["ids"], want[rank][b]["x"]), b
    assert processes_using(run) == []


@pytest.mark.slow
def test_a_finite_stream_ends_a_ddp_run_with_exit_0_every_sample_once(tmp_path):
    corpus = tmp_path / "corpus"
    words = small_corpus(corpus)
    every_id = {f"{key}#{i}" for key, n in words.items() for i in range(math.ceil(n / 100))}
    server_options = [
        "source=files",
        f"source.paths=[{corpus}]",
        "source.validation_fraction=0",
        "chunk.words=100",
        "end.max_epochs=1",
        f"hydra.run.dir={tmp_path / 'server'}",
    ]
    run = tmp_path / "run"
    with ServerProcess(server_options) as server:
        # What each of the two consumers is served, read to its end over the protocol.
        served = []
        for rank in (0, 1):
            c = Client(server.url)
            c.handshake({"rank": rank, "world_size": 2, "worker": 0, "num_workers": 1})
            stream = []
            while (reply := c.data(16))["payload"] != ["terminate"]:
                stream += ids(reply)
            c.close()
            served.append(stream)
        done = train(
            run,
            *DDP,
            f"data.stream.url={server.url}",
            "trainer.max_steps=100000",
            "data.stream.valid_size=0",
            "data.stream.streaming_setup_samples=30",
            "tokenizer.vocab_size=300",
            "callbacks.sample_every=0",
            "callbacks.checkpoint_every=0",
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the server ended the stream" in done.stdout + done.stderr
    assert sorted(served[0] + served[1]) == sorted(every_id), "the epoch, read from the files"
    trained = [[i for b in sorted(batches(run, r).items()) for i in b[1]["ids"]] for r in (0, 1)]
    steps = [len(batches(run, r)) for r in (0, 1)]
    assert steps[0] == steps[1] > 0, "the ranks stopped after the same step"
    for rank in (0, 1):
        # Each rank trained its consumer's stream from the start, in order, nothing twice; what
        # is left is the tail after the step where the first stream ran out.
        assert trained[rank] == served[rank][: len(trained[rank])]
    assert not set(trained[0]) & set(trained[1])
    shorter = min((0, 1), key=lambda r: len(served[r]))
    tail = len(served[shorter]) - len(trained[shorter])
    assert tail <= 2, f"the rank whose stream ended first left {tail} samples untrained"


@pytest.mark.slow
def test_the_trainer_sends_the_servers_bearer_token_and_a_wrong_one_is_refused(tmp_path):
    token = "s3cret-t0ken-4242"
    steps = ["trainer.max_steps=2", "trainer.val_every=2", "callbacks.sample_every=2"]
    with ServerProcess(
        [f"hydra.run.dir={tmp_path / 'server'}"], env={"STREAMGPT_TOKEN": token}
    ) as server:
        good = start(
            tmp_path / "good",
            f"data.stream.url={server.url}",
            *steps,
            env={"STREAMGPT_TOKEN": token},
        )
        assert good.wait(600) == 0, output(tmp_path / "good")[-3000:]
        bad = start(
            tmp_path / "bad",
            f"data.stream.url={server.url}",
            *steps,
            env={"STREAMGPT_TOKEN": "wrong"},
        )
        assert bad.wait(600) == 2, output(tmp_path / "bad")[-3000:]
        missing = start(tmp_path / "none", f"data.stream.url={server.url}", *steps)
        assert missing.wait(600) == 2
    assert "refused our token" in output(tmp_path / "bad")
    assert "refused our token" in output(tmp_path / "none")
    for run in ("good", "bad", "none"):
        assert token not in output(tmp_path / run)
    # The embedded server takes the token from the same variable; the trainer sends it.
    embedded = start(tmp_path / "embedded", *steps, env={"STREAMGPT_TOKEN": token})
    assert embedded.wait(600) == 0, output(tmp_path / "embedded")[-3000:]
    assert token not in output(tmp_path / "embedded")
    assert token not in (tmp_path / "embedded" / "server" / "serve.log").read_text()
