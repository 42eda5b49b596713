"""The stream client (StreamDataModule) against real servers on free loopback ports."""

from __future__ import annotations

import io
import itertools
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest
import torch

from streamgpt.data import RetryConfig, StreamDataModule, TokenizerConfig
from streamgpt.data.client import Connection, StreamError
from streamgpt.data.config import ElasticConfig
from streamgpt.data.tokenizer import load, train_bpe
from streamgpt.server.process import ServerProcess

from .helpers.core_server import CoreOnlyServer
from .helpers.servers import stream_cfg

EOS = "<|endoftext|>"


@pytest.fixture
def make_dm(stream_server, shared_tokenizer, tmp_path):
    """make_dm(name, **stream options) -> a set-up StreamDataModule with the shared tokenizer."""

    def make(name="run", rank=None, world_size=None, url=None, **overrides):
        run = tmp_path / name
        run.mkdir(exist_ok=True)
        if not (run / "tokenizer.json").exists():
            shutil.copy(shared_tokenizer, run / "tokenizer.json")
        cfg = stream_cfg(url or stream_server.url, **overrides)
        dm = StreamDataModule(
            cfg, TokenizerConfig(vocab_size=1024), run, rank=rank, world_size=world_size
        )
        dm.setup()
        return dm

    return make


def take(dm: StreamDataModule, n: int, after=None):
    """n training batches as the trainer would see them: (x, y, sample ids that start in it)."""
    loader = iter(dm.train_dataloader())
    out = []
    try:
        for _ in range(n):
            x, y = dm.on_before_batch_transfer(next(loader), 0)
            out.append((x, y, dm.last_ids))
            if after is not None:
                after(len(out))
    finally:
        if hasattr(loader, "_shutdown_workers"):
            loader._shutdown_workers()
    return out


def checkpoint_roundtrip(state: dict) -> dict:
    """The state as Lightning would save and load it (torch.save, weights_only load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_batches_are_shifted_windows_of_the_whole_token_stream(make_dm, stream_server):
    dm = make_dm(batch_size=16, max_length=64, samples_per_request=32)
    batches = take(dm, 100)  # ~100k tokens: more than the first play
    for x, y, _ in batches:
        assert x.shape == y.shape == (16, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x[1:, 0], y[:-1, -1]), "rows are consecutive windows (stride max_length)"
    for (_, y0, _), (x1, _, _) in itertools.pairwise(batches):
        assert y0[-1, -1] == x1[0, 0]
    trained = torch.cat([x.flatten() for x, _, _ in batches])
    # Ground truth: the same consumer's samples read straight from the server, tokenized whole.
    conn = Connection(stream_server.url).open({"rank": 0, "world_size": 1, "seed": 0})
    texts, want = [], []
    while len(want) < trained.numel():
        conn.request(8)
        texts += conn.receive_data().texts
        want = dm.tokenizer.encode("".join(texts), add_special_tokens=False).ids
    conn.close()
    assert trained.tolist() == want[: trained.numel()], "every token of the stream, in order"
    eos, pad = dm.eos_id, dm.tokenizer.token_to_id("<|pad|>")
    assert (trained == eos).sum() >= 1, "documents are separated by the end-of-text token"
    assert not (trained == pad).any(), "no padding"


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_never_share_a_sample(make_dm, workers):
    seen: dict[str, int] = {}
    counts = []
    for rank in range(2):
        dm = make_dm(
            f"rank{rank}", rank=rank, world_size=2, num_workers=workers, batch_size=8, max_length=64
        )
        batches = take(dm, 60)
        counts.append(len(batches))
        for _, _, ids in batches:
            for sample_id in ids:
                assert sample_id not in seen, (
                    f"{sample_id} went to rank {seen[sample_id]} and {rank}"
                )
                seen[sample_id] = rank
    assert counts == [60, 60]
    assert len(seen) >= 40, "enough samples to mean something"


def test_the_same_seed_gives_the_same_batches_and_another_seed_another_order(make_dm):
    first = [x for x, _, _ in take(make_dm("a", seed=1), 15)]
    again = [x for x, _, _ in take(make_dm("b", seed=1), 15)]
    other = [x for x, _, _ in take(make_dm("c", seed=2), 15)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("workers", "k"), [(0, 7), (2, 7), (2, 8)])
def test_a_resumed_module_continues_with_the_next_batch(make_dm, workers, k):
    n = 16
    reference = make_dm("ref", num_workers=workers)
    states = {}
    batches = take(reference, n, after=lambda i: states.setdefault(i, reference.state_dict()))
    resumed = make_dm("ref", num_workers=workers)  # everything rebuilt, same run folder
    resumed.load_state_dict(checkpoint_roundtrip(states[k]))
    continued = take(resumed, n - k)
    for (x, y, ids), (x2, y2, ids2) in zip(batches[k:], continued, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and ids == ids2


@pytest.mark.parametrize("elastic", [0, 2])
def test_two_ranks_resumed_twice_continue_with_the_next_batches(make_dm, elastic):
    """Each rank keeps only its own streams' states after a resume: the next checkpoint gathers
    every rank's, and a stale copy of another rank's would overwrite that rank's newer one."""
    options = {"elastic": ElasticConfig(streams=elastic, phases=1)}

    def ranks(name: str) -> list[StreamDataModule]:
        return [make_dm(name, rank=r, world_size=2, **options) for r in (0, 1)]

    def gathered(dms: list[StreamDataModule]) -> dict:
        """What the all-gather of state_dict makes of the ranks' parts, in rank order."""
        parts = [dm.state_dict() for dm in dms]
        key = "units" if elastic else "consumers"
        state = {**parts[0], "batches": {"0": parts[0]["batches"]["0"], "1": 0}}
        state[key] = {}
        for rank, part in enumerate(parts):
            state[key].update(part[key])
            state["batches"][str(rank)] = part["batches"][str(rank)]
        return checkpoint_roundtrip(state)

    want = [take(dm, 9) for dm in ranks("ref")]
    first = ranks("a")
    for dm in first:
        take(dm, 3)
    second = ranks("a")
    for dm, state in zip(second, [gathered(first)] * 2, strict=True):
        dm.load_state_dict(state)
        take(dm, 3)
    third = ranks("a")
    state = gathered(second)
    for rank, dm in enumerate(third):
        dm.load_state_dict(state)
        for (x, _, ids), (x2, _, ids2) in zip(want[rank][6:], take(dm, 3), strict=True):
            assert torch.equal(x, x2) and ids == ids2, f"rank {rank} after the second resume"


def test_a_resume_with_other_ranks_or_workers_is_refused(make_dm):
    dm = make_dm(num_workers=0)
    take(dm, 2)
    other = make_dm(num_workers=2)
    with pytest.raises(ValueError, match="read by 1 ranks x 1 workers"):
        other.load_state_dict(dm.state_dict())


def test_the_client_survives_a_killed_and_restarted_server(make_dm, tmp_path):
    reference_server = ServerProcess([f"hydra.run.dir={tmp_path / 's0'}"]).start()
    want = take(make_dm("ref", url=reference_server.url), 60)
    reference_server.stop()

    server = ServerProcess([f"hydra.run.dir={tmp_path / 's1'}"]).start()
    port = server.url.split(":")[2].split("/")[0]
    dm = make_dm("chaos", url=server.url, prefetch_batches=2, requests_in_flight=1)
    restarted = []

    def kill_and_restart(i: int) -> None:
        if i in (15, 40):
            old = restarted[-1] if restarted else server
            old.proc.send_signal(signal.SIGKILL)
            old.proc.wait()
            time.sleep(0.5)  # the trainer keeps asking while nothing listens
            restarted.append(
                ServerProcess([f"port={port}", f"hydra.run.dir={tmp_path / f's{i}'}"]).start()
            )

    try:
        got = take(dm, 60, after=kill_and_restart)
    finally:
        for s in [server, *restarted]:
            s.stop()
    assert len(restarted) == 2
    assert [ids for _, _, ids in got] == [ids for _, _, ids in want]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want, strict=True))


def test_a_server_that_never_comes_back_fails_clearly_within_the_budget(make_dm, tmp_path):
    server = ServerProcess([f"hydra.run.dir={tmp_path / 's'}"]).start()
    retry = RetryConfig(budget_s=3, backoff_s=0.2, max_backoff_s=0.5)
    dm = make_dm("gone", url=server.url, recv_timeout_s=2, retry=retry)
    loader = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(loader), 0)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    started = time.monotonic()

    def drain() -> None:
        for _ in range(10_000):
            next(loader)

    with pytest.raises(StreamError) as failed:
        drain()
    # It kept trying for the budget (its last wait would have passed it), and no longer.
    elapsed = time.monotonic() - started
    assert 3 - 0.5 <= elapsed < 3 + 2 + 5, elapsed
    message = str(failed.value)
    assert server.url in message and "make serve" in message and "retry.budget_s" in message


def test_no_server_at_the_url_says_how_to_start_one(tmp_path):
    cfg = stream_cfg("ws://127.0.0.1:9/ws")
    with pytest.raises(StreamError, match=r"no stream server at ws://127.0.0.1:9/ws .*make serve"):
        StreamDataModule(cfg, TokenizerConfig(), tmp_path).prepare_data()


def test_the_tokenizer_round_trips_text_and_chunks_tokenize_like_whole_documents(shared_tokenizer):
    tok = load(shared_tokenizer, EOS)
    for sample in [
        "To be, or not to be: that is the question.\n\n  Whether 'tis nobler",
        "Unicode survives: naïve café, 東京, emoji 🎭, tabs\tand\r\nCRLF",
    ]:
        assert tok.decode(tok.encode(sample).ids) == sample
    from streamgpt.server.corpus import Chunking

    doc = "  First line,\n\n   second    line with  spaces.\nThird; and the end.  "
    chunks = Chunking(words=3).split(doc)
    by_chunk = [i for c in chunks for i in tok.encode(c, add_special_tokens=False).ids]
    whole = tok.encode("".join(chunks), add_special_tokens=False).ids
    assert by_chunk == whole
    assert whole[-1] == tok.token_to_id(EOS)


def test_a_pretrained_tokenizer_file_is_used_as_is(stream_server, tmp_path):
    given = tmp_path / "given.json"
    train_bpe(["some text to learn from " * 50], 300, 1, "<eos>", "<pad>").save(str(given))
    cfg = stream_cfg(stream_server.url)
    tok_cfg = TokenizerConfig(name="pretrained", path=str(given), eos_token="<eos>")
    dm = StreamDataModule(cfg, tok_cfg, tmp_path / "run")
    dm.setup()
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == given.read_bytes()
    original = load(given, "<eos>")
    assert dm.vocab_size == original.get_vocab_size()
    x, _, _ = take(dm, 3)[-1]
    assert dm.eos_id == original.token_to_id("<eos>")
    assert x.max() < original.get_vocab_size()
    # The server's <|endoftext|> marker becomes this tokenizer's own end token.
    ids = dm._encoder()(["the end.<|endoftext|>"])[0]
    assert ids[-1] == dm.eos_id and dm.tokenizer.decode(ids[:-1]) == "the end."


def test_a_pretrained_tokenizer_without_the_eos_token_is_refused(tmp_path, stream_server):
    given = tmp_path / "given.json"
    train_bpe(["abc " * 20], 300, 1, "<eos>", "<pad>").save(str(given))
    tok_cfg = TokenizerConfig(name="pretrained", path=str(given))
    with pytest.raises(ValueError, match=re.escape("has no end-of-text token '<|endoftext|>'")):
        StreamDataModule(stream_cfg(stream_server.url), tok_cfg, tmp_path / "run").prepare_data()


def test_a_core_only_server_still_trains(tmp_path, caplog):
    server = CoreOnlyServer()
    try:
        caplog.set_level(logging.WARNING, logger="streamgpt.data")
        cfg = stream_cfg(server.url, valid_size=8, streaming_setup_samples=50)
        dm = StreamDataModule(cfg, TokenizerConfig(vocab_size=400), tmp_path)
        dm.setup()
        batches = take(dm, 20)
        assert len(batches) == 20 and dm.val_x is not None
        lines = (tmp_path / "validation.jsonl").read_bytes().splitlines()
        held_out = {orjson.loads(line)["id"] for line in lines}
        assert held_out == server.validation, "EIR's way: the server was told the validation ids"
        trained = {i for _, _, ids in batches for i in ids}
        assert trained and not trained & held_out
        assert "speaks only the core protocol" in caplog.text
    finally:
        server.stop()


def test_consumer_k_reads_from_replica_k_mod_n_and_replicas_give_the_same_batches(
    make_dm, tmp_path
):
    with (
        ServerProcess([f"hydra.run.dir={tmp_path / 'a'}"]) as a,
        ServerProcess([f"hydra.run.dir={tmp_path / 'b'}"]) as b,
    ):
        replicas = take(make_dm("replicas", url=[a.url, b.url], num_workers=2), 12)
        served = []
        for server in (a, b):
            conn = Connection(server.url).open()
            served.append(conn.status()["samples_served"])
            conn.close()
        single = take(make_dm("single", url=a.url, num_workers=2), 12)
    assert all(n > 0 for n in served), f"both replicas served consumers: {served}"
    for (x1, _, ids1), (x2, _, ids2) in zip(replicas, single, strict=True):
        assert torch.equal(x1, x2) and ids1 == ids2


def test_replicas_of_different_corpora_are_refused(make_dm, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some other text " * 300)
    with (
        ServerProcess([f"hydra.run.dir={tmp_path / 'a'}"]) as a,
        ServerProcess(
            [
                "source=files",
                f"source.paths=[{tmp_path / 'corpus'}]",
                "source.validation_fraction=0",
                f"hydra.run.dir={tmp_path / 'b'}",
            ]
        ) as b,
        pytest.raises(StreamError, match="the servers disagree"),
    ):
        make_dm("mixed", url=[a.url, b.url])


@pytest.fixture
def proxy(stream_server):
    from .helpers.proxy import ChaosProxy

    chaos = ChaosProxy(stream_server.url)
    yield chaos
    chaos.stop()


@pytest.mark.parametrize("fault", ["stall", "garble_once"])
def test_a_stalled_or_garbled_server_is_detected_and_the_stream_continues_exactly(
    make_dm, proxy, fault
):
    want = take(make_dm("ref", samples_per_request=2), 40)
    dm = make_dm(
        "chaos",
        url=proxy.url,
        samples_per_request=2,
        prefetch_batches=1,
        requests_in_flight=1,
        recv_timeout_s=1.0,
    )

    def inject(i: int) -> None:
        if i == 10:
            proxy.mode = fault
            if fault == "stall":
                threading.Timer(3.0, lambda: setattr(proxy, "mode", "pass")).start()

    got = take(dm, 40, after=inject)
    assert proxy.connections >= 2, "the client reconnected"
    assert [ids for _, _, ids in got] == [ids for _, _, ids in want]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("fault", ["stall", "garble"])
def test_a_server_that_stays_broken_ends_in_a_clear_error_within_the_budget(make_dm, proxy, fault):
    dm = make_dm(
        "broken",
        url=proxy.url,
        recv_timeout_s=1.0,
        prefetch_batches=1,
        retry=RetryConfig(budget_s=4, backoff_s=0.2, max_backoff_s=1),
    )
    loader = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(loader), 0)
    proxy.mode = fault
    started = time.monotonic()

    def drain() -> None:
        for _ in range(10_000):
            next(loader)

    with pytest.raises(StreamError, match=r"could not get data from it for 4 s"):
        drain()
    elapsed = time.monotonic() - started
    assert 4 - 1 <= elapsed < 4 + 1 + 5, elapsed  # the budget, less at most one backoff


EXIT_WHILE_BUSY = """
import atexit, sys, threading

def consumers_left():  # registered first, so it runs after streamgpt's own exit handler
    alive = [t.name for t in threading.enumerate() if t.name.startswith("stream-consumer")]
    print("consumer threads at exit:", alive, flush=True)

atexit.register(consumers_left)

from streamgpt.data import StreamDataModule, TokenizerConfig
from streamgpt.data.config import StreamConfig

cfg = StreamConfig(url=sys.argv[1], batch_size=1, max_length=8, valid_size=0,
                   prefetch_batches=100000, samples_per_request=64)
dm = StreamDataModule(cfg, TokenizerConfig(vocab_size=1024), sys.argv[2])
dm.setup()
batches = iter(dm.train_dataloader())
print(tuple(next(batches)["x"].shape), flush=True)
# Exit at once, the iterator still open: the consumer thread is packing thousands of batches.
"""


def test_a_process_exits_cleanly_while_its_consumer_thread_is_busy(
    stream_server, shared_tokenizer, tmp_path
):
    """The exit-134 abort ("terminate called without an active exception"): a daemon thread in a
    torch operator while the interpreter finalizes. The consumer thread never calls into torch,
    and is stopped and joined before the interpreter finalizes."""
    shutil.copy(shared_tokenizer, tmp_path / "tokenizer.json")
    script = tmp_path / "exit_while_busy.py"
    script.write_text(EXIT_WHILE_BUSY)
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(script), stream_server.url, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == "(1, 8)\nconsumer threads at exit: []\n"
