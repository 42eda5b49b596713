"""`python eval.py`: a checkpoint's loss, perplexity and bits per byte. It reproduces the run's
last val/loss and val/bpb on the held-out split, counts the bytes the targets stand for, scores a
file the same whether read from disk or streamed by a `files` server, writes eval.json beside the
checkpoint, logs a W&B eval run in the training run's group, and refuses bad input in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import orjson
import pytest
import torch
from hydra import compose, initialize_config_dir

from streamgpt.bpb import token_byte_lengths
from streamgpt.checkpoints import run_checkpoint
from streamgpt.data.tokenizer import train_bpe
from streamgpt.evaluation.config import register_configs, validate
from streamgpt.evaluation.task import evaluate
from streamgpt.lit_module import pad_vocab
from streamgpt.model import GPT, GPTConfig
from streamgpt.server.config import FilesSourceConfig
from streamgpt.server.corpus import Chunking
from streamgpt.server.sources import build_corpus

from .helpers.runs import REPO, SMALL, environment, train
from .helpers.wandb_log import history, run_info

CONF = REPO / "conf"
EOS, PAD = "<|endoftext|>", "<|pad|>"
# Bytes of one to four UTF-8 bytes per character, and a word split across chunks.
TEXT = (
    "  Naïve café owners — “quoted” — sell crème brûlée for 5 €; 🍰 costs more.\n\n"
    + " ".join(f"word{i % 23} and-so-on" for i in range(120))
    + "\nThe end.\n"
)


def compose_eval(*overrides: str):
    register_configs(CONF)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["logger=none", *overrides])
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def fake_run(shakespeare, tmp_path_factory) -> Path:
    """A run folder in a second: a BPE trained on a few plays, an untrained GPT's checkpoint."""
    run = tmp_path_factory.mktemp("fake-run")
    tokenizer = train_bpe(list(shakespeare.texts[:4]), 400, 2, EOS, PAD)
    tokenizer.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=pad_vocab(tokenizer.get_vocab_size()), context=32, d_model=32, n_layers=1
    )
    weights = {f"model.{k}": v for k, v in GPT(cfg).state_dict().items()}
    state = {"state_dict": weights, "global_step": 7, "hyper_parameters": {"model": asdict(cfg)}}
    (run / "checkpoints").mkdir()
    torch.save(state, run / "checkpoints" / "last.ckpt")
    return run


def test_the_byte_table_gives_each_token_the_utf8_bytes_it_stands_for(fake_run):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fake_run / "tokenizer.json"))
    table = token_byte_lengths(tokenizer)
    ids = tokenizer.encode(TEXT + EOS + TEXT, add_special_tokens=False).ids
    assert int(table[ids].sum()) == 2 * len(TEXT.encode())
    assert table[tokenizer.token_to_id(EOS)] == table[tokenizer.token_to_id(PAD)] == 0
    assert len(table) == tokenizer.get_vocab_size() and int(table.min()) == 0


def test_bits_per_byte_counts_the_bytes_of_the_text_the_targets_cover(fake_run, tmp_path):
    from tokenizers import Tokenizer

    (tmp_path / "notes.txt").write_text(TEXT)
    record = evaluate(compose_eval(f"ckpt_path={fake_run}", f"data.files=[{tmp_path}]"), tmp_path)
    tokenizer = Tokenizer.from_file(str(fake_run / "tokenizer.json"))
    # The document as the server's files source serves it: stripped, ended by the eos token.
    ids = tokenizer.encode(TEXT.strip() + EOS, add_special_tokens=False).ids
    assert record["tokens"] == len(ids), "every token is a target, after an eos, the first too"
    assert record["bytes"] == len(TEXT.strip().encode()), "every byte of the text is scored"
    assert record["sequences"] == math.ceil(len(ids) / 32)
    # An untrained model: about ln(vocab) nats per token, spread over the bytes of a token.
    assert abs(record["loss"] - math.log(pad_vocab(400))) < 0.5
    nats_per_byte = record["bpb"] * math.log(2)
    assert 0.2 * record["loss"] < nats_per_byte < record["loss"]
    assert (
        json.loads((fake_run / "checkpoints" / "eval.json").read_text())["bytes"]
        == (record["bytes"])
    )


def test_files_on_disk_and_the_same_files_streamed_by_a_files_server_score_the_same(
    fake_run, tmp_path, serve
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_text("Short one, under twenty words.\n")
    rows = [{"text": f"Line {i}: " + TEXT[i * 7 :]} for i in range(3)]
    (corpus / "c.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    source = FilesSourceConfig(paths=[str(corpus)], validation_docs=0)
    server = serve(build_corpus(source, Chunking(words=16)))  # chunks cut mid-document
    on_disk = evaluate(compose_eval(f"ckpt_path={fake_run}", f"data.files=[{corpus}]"), tmp_path)
    streamed = evaluate(compose_eval(f"ckpt_path={fake_run}", f"data.url={server.url}"), tmp_path)
    assert on_disk["data"]["documents"] == streamed["data"]["documents"] == 5
    figures = ("loss", "bpb", "tokens", "bytes", "sequences")
    assert {k: streamed[k] for k in figures} == pytest.approx({k: on_disk[k] for k in figures})
    assert streamed["data"]["kind"] == "stream" and on_disk["data"]["kind"] == "files"


def test_a_run_folder_means_its_last_checkpoint_or_with_checkpoint_best_the_best(
    fake_run, tmp_path
):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last = fake_run / "checkpoints" / "last.ckpt"
    for name in ("last", "step=0000003-val_loss=5.2500", "step=0000006-val_loss=5.1250"):
        (run / "checkpoints" / f"{name}.ckpt").write_bytes(last.read_bytes())
    assert run_checkpoint(run, "last") == run / "checkpoints" / "last.ckpt"
    best = run / "checkpoints" / "step=0000006-val_loss=5.1250.ckpt"
    assert run_checkpoint(run, "best") == run_checkpoint(run / "checkpoints", "best") == best
    assert run_checkpoint(best, "last") == best, "a file is taken as given"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such checkpoint file or run folder"),
        ("truncated", "is truncated or corrupt"),
        ("no checkpoints", "has no checkpoints"),
        ("csv file", "unsupported file type"),
        ("empty file", "the text to evaluate is empty"),
    ],
)
def test_bad_input_is_refused_with_a_message_that_says_what_is_wrong(
    case, message, fake_run, tmp_path
):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "cut.ckpt").write_bytes((fake_run / "checkpoints/last.ckpt").read_bytes()[:4000])
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    overrides = {
        "missing": [f"ckpt_path={tmp_path / 'nothing.ckpt'}"],
        "truncated": [f"ckpt_path={tmp_path / 'cut.ckpt'}"],
        "no checkpoints": [f"ckpt_path={tmp_path / 'run'}"],
        "csv file": [f"ckpt_path={fake_run}", f"data.files=[{tmp_path / 'table.csv'}]"],
        "empty file": [f"ckpt_path={fake_run}", f"data.files=[{tmp_path / 'empty.txt'}]"],
    }[case]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate(compose_eval(*overrides), tmp_path)


def run_eval(*overrides: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "eval.py", f"hydra.run.dir={out}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(),
    )


def test_eval_py_refuses_a_truncated_checkpoint_in_one_line_with_exit_2(fake_run, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((fake_run / "checkpoints/last.ckpt").read_bytes()[:4000])
    done = run_eval(f"ckpt_path={cut}", "logger=none", out=tmp_path / "eval")
    said = done.stdout + done.stderr
    assert done.returncode == 2, said[-2000:]
    errors = [line for line in said.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(cut) in errors[0] and "Traceback" not in said


# -- a real run: train.py, then eval.py on its folder ------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny train.py run logged to W&B (offline), validated on 5 batches at steps 3 and 6."""
    run = tmp_path_factory.mktemp("eval") / "run"
    small = [o for o in SMALL if o != "logger=csv"]
    steps = ["trainer.max_steps=6", "trainer.val_every=3", "trainer.limit_val_batches=5"]
    steps += ["callbacks.checkpoint_every=3", "callbacks.sample_every=3", "logger=wandb"]
    done = train(run, *small, *steps, small=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


@pytest.mark.slow
def test_eval_of_a_run_reproduces_its_last_val_loss_and_bpb_and_logs_an_eval_run_in_its_group(
    trained_run, tmp_path
):
    train_wandb = next((trained_run / "wandb").glob("offline-run-*"))
    rows = [r for r in history(train_wandb) if "val/loss" in r]
    assert [r["_step"] for r in rows] == [3, 6]
    assert all(math.isfinite(r["val/bpb"]) and r["val/bpb"] > 0 for r in rows)

    done = run_eval(f"ckpt_path={trained_run}", out=tmp_path / "eval")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((trained_run / "checkpoints" / "eval.json").read_text())
    assert record["checkpoint"] == str(trained_run / "checkpoints" / "last.ckpt")
    assert record["step"] == 6 and record["data"]["kind"] == "validation"
    assert record["sequences"] == 5 * 8, "the 5 batches of 8 that training validated on"
    assert record["tokens"] == 40 * 64
    assert abs(record["loss"] - rows[-1]["val/loss"]) < 1e-4
    assert abs(record["bpb"] - rows[-1]["val/bpb"]) < 1e-4
    assert record["ppl"] == pytest.approx(math.exp(record["loss"]))

    eval_wandb = next((tmp_path / "eval" / "wandb").glob("offline-run-*"))
    info, trained = run_info(eval_wandb), run_info(train_wandb)
    assert info["job_type"] == "eval" and info["run_group"] == trained["run_group"]
    assert info["run_id"] == record["wandb"]["id"] != trained["run_id"]
    (logged,) = history(eval_wandb)
    assert logged["_step"] == 6 and logged["eval/loss"] == pytest.approx(record["loss"])
    assert logged["eval/bpb"] == pytest.approx(record["bpb"])


@pytest.mark.slow
def test_eval_of_a_bf16_mixed_run_reproduces_its_val_loss_under_the_runs_precision(tmp_path):
    """eval.py takes the run's precision: bf16-mixed autocasts as Lightning's validation did."""
    import csv

    run = tmp_path / "run"
    steps = ["trainer.max_steps=4", "trainer.val_every=4", "trainer.limit_val_batches=3"]
    steps += ["callbacks.checkpoint_every=4", "callbacks.sample_every=4", "precision=bf16-mixed"]
    done = train(run, *steps)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    done = run_eval(f"ckpt_path={run}", "logger=none", out=tmp_path / "eval")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((run / "checkpoints" / "eval.json").read_text())
    assert record["precision"] == "bf16-mixed"
    assert abs(record["loss"] - logged[-1]) < 1e-4, (record["loss"], logged[-1])
