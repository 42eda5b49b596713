"""The template's habits, in real runs: loggers and callbacks added with YAML alone (Hydra
`_target_`), several loggers at once, the resolved config as a tree, top-level tags, a git-ignored
conf/local/, the debug configs (overfit, profiler, limit) and pretrained tokenizers by folder or
Hugging Face hub name."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer

from streamgpt.config import register_configs, validate
from streamgpt.data import tokenizer as tokenizers

from .helpers.runs import REPO, SMALL, train
from .helpers.wandb_log import run_info

CONF = REPO / "conf"
# SMALL without its logger: each test says which one it wants.
TINY = [o for o in SMALL if not o.startswith("logger=")]
SEARCH = "hydra.searchpath=[pkg://streamgpt.server.conf,file://tests/conf]"


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def scalars(folder: Path) -> dict[str, list[float]]:
    """The scalars of a TensorBoard run folder, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in done.stderr
    return lines[0]


# -- loggers and callbacks from YAML ------------------------------------------------------------


@pytest.mark.slow
def test_logger_tensorboard_writes_the_training_scalars(tmp_path):
    run = tmp_path / "run"
    done = train(run, "debug=default", "logger=tensorboard", *TINY, small=False)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = scalars(run / "tensorboard" / "version_0")
    assert len(logged["train/loss"]) == 6, "every step (log_every_n_steps=1)"
    assert len(logged["val/loss"]) == 2 and len(logged["val/bpb"]) == 2  # steps 3 and 6
    assert f"tensorboard --logdir {run / 'tensorboard'}" in done.stdout


@pytest.mark.slow
def test_many_loggers_tags_a_yaml_callback_and_the_config_tree(tmp_path):
    """logger=many: W&B, CSV and TensorBoard at once; tags into W&B; Lightning's
    LearningRateMonitor added by a config file alone (tests/conf/callbacks/lr_monitor.yaml)."""
    run = tmp_path / "run"
    overrides = ["debug=default", "logger=many", "tags=[smoke,yaml-callback]", *TINY]
    done = train(run, *overrides, SEARCH, "callbacks=lr_monitor", small=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [wandb_run] = (run / "wandb").glob("offline-run-*")
    assert run_info(wandb_run)["tags"] == ["smoke", "yaml-callback"]
    rows = metrics(run)
    # One column per parameter group (the demo's MuonAdamW: Muon's, AdamW's with and without
    # weight decay), a row per step.
    columns = [c for c in rows[0] if c.startswith("lr-") and c.endswith("/pg1")]
    assert len(columns) == 1, list(rows[0])
    lrs = [float(r[columns[0]]) for r in rows if r.get(columns[0])]
    assert len(lrs) >= 6 and lrs == sorted(lrs) and lrs[0] > 0, "warmup: rising every step"
    assert len(scalars(run / "tensorboard" / "version_0")["train/loss"]) == 6
    # The resolved config, printed before training starts and kept in the run folder.
    tree = (run / "config_tree.log").read_text()
    assert "lightning.pytorch.callbacks.LearningRateMonitor" in tree
    assert f"save_dir: {run}" in tree, "resolved: no ${paths.output_dir} left"
    assert "${" not in tree
    printed = done.stdout
    assert printed.index("CONFIG\n") < printed.index("`Trainer.fit` stopped"), "at the start"


def test_a_logger_or_callback_that_is_not_one_is_refused_in_one_line(tmp_path):
    done = train(
        tmp_path / "run",
        "debug=default",
        "+logger.bad._target_=collections.OrderedDict",
        *TINY,
        small=False,
    )
    line = one_error_line(done)
    assert "logger.bad: collections.OrderedDict is not a Lightning logger" in line


# -- the template's comforts --------------------------------------------------------------------


def test_conf_local_is_merged_when_present_and_never_committed(tmp_path):
    conf = shutil.copytree(CONF, tmp_path / "conf")
    register_configs(conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        before = compose("train", overrides=["paths.output_dir=x", "paths.root_dir=y"])
        (conf / "local" / "default.yaml").write_text(
            "# @package _global_\ntrainer:\n  devices: 3\ntags: [this-machine]\n"
        )
        after = compose("train", overrides=["paths.output_dir=x", "paths.root_dir=y"])
    assert before.trainer.devices == "auto" and list(before.tags) == []
    assert after.trainer.devices == 3 and list(after.tags) == ["this-machine"]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0, "conf/local/*.yaml must be git-ignored"


def test_debug_limit_shortens_the_configured_run_and_nothing_else():
    register_configs(CONF)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose("train", overrides=["model=babygpt"])
        limited = compose("train", overrides=["model=babygpt", "debug=limit"])
    assert (limited.trainer.max_steps, limited.trainer.limit_val_batches) == (20, 2)
    assert limited.model == plain.model and limited.tokenizer == plain.tokenizer
    assert limited.data == plain.data
    validate(limited)


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_of_a_tiny_model_under_half(tmp_path):
    run = tmp_path / "run"
    done = train(run, "debug=overfit", "logger=csv", *TINY, small=False)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(r["train/loss"]) for r in metrics(run) if r.get("train/loss")]
    assert losses[0] > 4.0, "it starts from an untrained model"
    assert losses[-1] < 0.5, losses[-10:]


@pytest.mark.slow
def test_debug_profiler_leaves_a_trace_and_a_table_in_the_run_folder(tmp_path):
    run = tmp_path / "run"
    done = train(run, "debug=profiler", "logger=none", *TINY, small=False)
    assert done.returncode == 0, done.stderr[-3000:]
    traces = list((run / "profiler").glob("*.pt.trace.json"))
    assert traces and all(t.stat().st_size > 1000 for t in traces), list(run.iterdir())
    assert "streamgpt.model.GPT" in (run / "profiler" / "fit-profile.txt").read_text()


# -- pretrained tokenizers by folder or hub name -----------------------------------------------


@pytest.fixture
def tokenizer_json(tmp_path) -> Path:
    tok = tokenizers.train_bpe(["a few words of text"] * 20, 300, 1, "<|endoftext|>", "<|pad|>")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_a_tokenizer_path_may_be_a_file_or_a_folder_holding_one(tokenizer_json, tmp_path):
    assert tokenizers.locate(str(tokenizer_json)) == tokenizer_json
    assert tokenizers.locate(str(tokenizer_json.parent)) == tokenizer_json
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"the folder has no tokenizer\.json"):
        tokenizers.locate(str(empty))


def test_a_hub_name_comes_from_the_cache_when_the_hub_is_offline(
    tokenizer_json, tmp_path, monkeypatch
):
    """What a download left in the Hugging Face cache is used offline (the cache's own layout)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tok" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tokenizer_json, snapshot / "tokenizer.json")
    (cache / "models--org--tok" / "refs").mkdir()
    (cache / "models--org--tok" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    found = tokenizers.locate("org/tok")
    assert (
        Tokenizer.from_file(str(found)).to_str()
        == Tokenizer.from_file(str(tokenizer_json)).to_str()
    )
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        tokenizers.locate("org/other")


def test_a_hub_name_with_the_hub_unreachable_fails_in_one_line_saying_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ValueError, match=r"tokenizer\.path=gpt2") as error:
        tokenizers.locate("gpt2")
    message = str(error.value)
    assert "tokenizer.path=gpt2" in message and "http://127.0.0.1:9 does not answer" in message
    assert "\n" not in message


def test_train_py_with_a_hub_name_offline_exits_2_in_one_line(tmp_path):
    done = train(
        tmp_path / "run",
        "debug=default",
        "logger=none",
        "tokenizer=pretrained",
        "tokenizer.path=gpt2",
        *TINY,
        small=False,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")},
    )
    line = one_error_line(done)
    assert "tokenizer.path=gpt2: not a local file or folder" in line
    assert "HF_HUB_OFFLINE is set" in line


# -- experiment=nanogpt_cpu: nanoGPT's CPU recipe ------------------------------------------------


def test_the_nanogpt_cpu_experiment_is_nanogpts_macbook_run():
    """The values of nanoGPT's README CPU command and config/train_shakespeare_char.py (the
    experiment file says which is which); validated as train.py would."""
    register_configs(CONF)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=nanogpt_cpu"])
    m, o = cfg.model, cfg.optimizer
    assert (m.n_layers, m.n_heads, m.d_model, m.context, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (m.norm, m.mlp, m.positions, m.bias, m.tie_embeddings, m.qk_norm) == (
        "layernorm",
        "gelu",
        "learned",
        False,
        True,
        False,
    )
    assert (cfg.data.stream.batch_size, cfg.data.stream.max_length) == (12, 64)
    assert (cfg.trainer.max_steps, o.decay_steps, o.schedule) == (2000, None, "cosine")
    assert (o.name, o.lr, list(o.betas), o.warmup_steps) == ("adamw", 1e-3, [0.9, 0.99], 100)
    assert (o.min_lr_ratio, o.weight_decay, o.grad_clip, o.eps) == (0.1, 0.1, 1.0, 1e-8)
    assert (cfg.tokenizer.name, cfg.trainer.precision, cfg.trainer.val_every) == (
        "bytes",
        "32-true",
        250,
    )
    # nanoGPT's evaluation costs 2 x eval_iters batches and it samples only after training.
    assert (cfg.trainer.limit_val_batches, cfg.callbacks.sample_every) == (40, 2000)
    validate(cfg)
