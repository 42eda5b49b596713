"""The Hydra app as users run it: `python train.py ...` in a subprocess, on a real stream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from streamgpt.config import register_configs, validate
from streamgpt.server.config import CONF as SERVER_CONF

from .helpers.runs import processes_using, start, wait_for
from .helpers.wandb_log import config_updates, history, run_info

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = [
    "model",
    "optimizer",
    "precision",
    "data/stream",
    "tokenizer",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "experiment",
    "debug",
    "hparams_search",
]
# Small enough for a CPU test: tiny batches and vocabulary, few validation samples.
SMALL = [
    "data.stream.batch_size=2",
    "data.stream.valid_size=16",
    "data.stream.streaming_setup_samples=150",
    "tokenizer.vocab_size=400",
    "trainer.limit_val_batches=1",
    "callbacks.samples.max_new_tokens=8",
]


def options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield f"{group}={path.stem}"
    for path in sorted((SERVER_CONF / "source").glob("*.yaml")):
        yield f"source@server.source={path.stem}"


def compose_train(overrides: list[str]):
    register_configs(CONF)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("override", list(options()))
def test_every_option_of_every_group_composes(override):
    cfg = compose_train([override])
    assert cfg.model.d_model > 0 and cfg.trainer.precision
    HydraConfig.instance().set_config(cfg)
    assert OmegaConf.select(cfg, "hydra.run.dir").startswith(f"outputs/{cfg.task}/runs/")
    if override in ("tokenizer=pretrained", "source@server.source=files"):
        # These need a path from the user; without one, validate names the key.
        with pytest.raises((MissingMandatoryValue, ValueError), match="path"):
            validate(cfg)
    elif override == "source@server.source=mix":
        with pytest.raises(ValueError, match=r"server\.source\.components must be at least one"):
            validate(cfg)  # the components are the user's to give
    elif override == "trainer=fsdp":  # the demo's Muon needs whole matrices
        with pytest.raises(ValueError, match=r"use trainer=ddp .* or optimizer=adamw"):
            validate(cfg)
        validate(compose_train([override, "optimizer=adamw"]))
    elif override == "precision=16-mixed" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="precision=16-mixed needs a GPU"):
            validate(cfg)  # the hardware check belongs to validation too: before any work
    elif not override.startswith("hparams_search"):
        validate(cfg)


# A bad value of every kind a user can type: each is refused by validate() in one line that
# names the key (and the accepted values), before any server, tokenizer or model exists.
BAD_VALUES = [
    ("model.n_heads=5", "model.d_model=128 is not divisible by model.n_heads=5"),
    ("model.norm=batch", "model.norm must be one of"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
    ("data.stream.max_length=256", "data.stream.max_length=256 exceeds model.context=128"),
    ("data.stream.batch_size=0", "data.stream.batch_size must be positive, got 0"),
    ("data.stream.num_workers=-1", "data.stream.num_workers must be >= 0"),
    ("data.stream.recv_timeout_s=0", "data.stream.recv_timeout_s must be positive"),
    ("data.stream.retry.max_backoff_s=0.1", "data.stream.retry.max_backoff_s must be >="),
    ("data.stream.url=http://host:80/ws", "data.stream.url must be a ws:// or wss:// URL"),
    ("data.stream.url=[]", "data.stream.url must be a ws:// or wss:// URL"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size must be >= 258"),
    ("tokenizer.name=wordpiece", "tokenizer.name must be bpe, bytes or pretrained"),
    ("data.stream.streaming_setup_samples=0", "data.stream.streaming_setup_samples must be"),
    ("optimizer.lr=-1", "optimizer.lr must be positive"),
    ("optimizer.name=sgd", "optimizer.name must be one of"),
    ("optimizer.schedule=linear", "optimizer.schedule must be one of ['cosine', 'wsd']"),
    ("optimizer.adam_lr=0", "optimizer=muon needs optimizer.adam_lr, positive"),
    ("model.mlp=relu", "model.mlp must be one of ['gelu', 'swiglu', 'relu2']"),
    ("trainer.precision=fp8", "trainer.precision must be one of"),
    ("trainer.accelerator=gpus", "trainer.accelerator must be one of"),
    ("trainer.deterministic=yes", "trainer.deterministic must be true, false or warn"),
    ("trainer.malloc=fast", "trainer.malloc must be speed or memory, got 'fast'"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches must be a fraction"),
    ("trainer.max_steps=0", "trainer.max_steps must be positive"),
    ("callbacks.checkpoint_every=150", "callbacks.checkpoint_every=150 must be a multiple"),
    ("callbacks.n_saved=-1", "callbacks.n_saved must be >= 0"),
    ("callbacks.samples.top_p=0", "callbacks.samples.top_p must be in (0, 1]"),
    ("callbacks.samples.temperature=0", "callbacks.samples.temperature must be positive"),
    ("logger.wandb.mode=cloud", "logger.wandb.mode must be auto, online or offline"),
    ("logger.wandb.log_model=best", "logger.wandb.log_model must be true, false or all"),
    ("+logger.mine.save_dir=x", "logger.mine needs a _target_ (the class to build"),
    ("+callbacks.extra.lr._target_=", "callbacks.extra.lr needs a _target_"),
    ("trainer.profiler=fast", "trainer.profiler must be null, simple, advanced, pytorch or"),
    ("+trainer.profiler.dirpath=x", "trainer.profiler needs a _target_"),
    ("tags=[ok,'']", "tags must be a list of words"),
    ("data.stream.overfit_batches=-1", "data.stream.overfit_batches must be >= 0"),
    ("data.stream.elastic.streams=-2", "data.stream.elastic.streams=-2: must be a positive"),
    ("resume=yes", "resume must be 'auto' or null"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path=/nonexistent/last.ckpt: no such file"),
    ("peak_flops=0", "peak_flops must be positive or null"),
    ("server.source.name=wiki", "server.source.name must be one of ['shakespeare'"),
    ("server.source.validation_fraction=1", "server.source.validation_fraction must be in [0, 1)"),
    ("server.chunk.words=0", "server.chunk.words must be a positive integer"),
    ("server.chunk.whitespace=strip", "server.chunk.whitespace must be preserve or collapse"),
    ("server.limits.max_batch_size=0", "server.limits.max_batch_size must be positive"),
    ("server.end.max_epochs=0", "server.end.max_epochs must be a positive integer or null"),
    ("server.port=70000", "server.port must be in [0, 65535]"),
    ("server.workers=0", "server.workers must be a positive integer, got 0"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES)
def test_every_bad_value_is_refused_in_one_line_naming_the_key(override, message):
    cfg = compose_train([override])
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        validate(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=3"], "ranks x accumulate_grad_batches = 3 does not divide the 4"),
        (["trainer.devices=2", "trainer.accumulate_grad_batches=4"], "= 8 does not divide the 4"),
        (["data.stream.num_workers=3"], "3 workers per rank do not divide phases x accumulate"),
        (["data.stream.overfit_batches=2"], "data.stream.overfit_batches and data.stream.elastic"),
    ],
)
def test_a_topology_elastic_data_cannot_serve_exactly_is_refused_in_one_line(overrides, message):
    elastic = ["data.stream.elastic.streams=4", "data.stream.elastic.phases=2"]
    cfg = compose_train([*elastic, "trainer.accelerator=cpu", *overrides])
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        validate(cfg)
    assert "\n" not in str(error.value)
    validate(compose_train([*elastic, "trainer.devices=2", "data.stream.num_workers=2"]))


def test_a_bad_files_source_is_refused_in_one_line_before_any_data_is_read(tmp_path):
    missing = tmp_path / "no-such-folder"
    cfg = compose_train(["source@server.source=files", f"server.source.paths=[{missing}]"])
    with pytest.raises(ValueError, match="is not a folder, file or glob"):
        validate(cfg)
    (tmp_path / "empty").mkdir()
    cfg = compose_train(["source@server.source=files", f"server.source.paths=[{tmp_path}/empty]"])
    with pytest.raises(ValueError, match="matched no"):
        validate(cfg)
    cfg = compose_train(["source@server.source=fineweb", "server.source.validation_docs=3"])
    with pytest.raises(
        ValueError, match=r"server\.source\.validation_docs must be null for fineweb"
    ):
        validate(cfg)
    # A remote server: the embedded server's settings are not used, so not checked.
    validate(compose_train(["data.stream.url=ws://127.0.0.1:9/ws", "server.chunk.words=0"]))


def train(
    run_dir: Path, *overrides: str, timeout: float = 600, env=None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_API_KEY": "", **(env or {})},
    )


def test_train_with_no_server_running_writes_every_artifact_and_leaves_nothing_behind(tmp_path):
    run = tmp_path / "run"
    done = train(
        run,
        "model=babygpt-tiny",
        "precision=bf16-mixed",
        "trainer.max_steps=5",
        "trainer.val_every=5",
        "callbacks.sample_every=5",
        "callbacks.checkpoint_every=5",
        "trainer.log_every_n_steps=1",
        *SMALL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in (
        ".hydra/config.yaml",
        "config_resolved.yaml",
        "environment.json",
        "train.log",
        "tokenizer.json",
        "checkpoints/last.ckpt",
        "samples/iter_5/manual_0.txt",
        "samples/iter_5/manual_1.txt",
        "samples/iter_5/auto_0.txt",
        "training_curve_LOSS.png",
        "server/serve.log",
    ):
        assert (run / name).exists(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["git"]["commit"] and env["key_packages"]["torch"].startswith("2.13")
    assert "trainer:\n  accelerator: auto" in (run / "config_resolved.yaml").read_text()
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    losses = [row["train/loss"] for row in history(wandb_runs[0]) if "train/loss" in row]
    assert len(losses) == 5
    assert f"run folder:  {run}" in done.stdout and "wandb sync" in done.stdout
    assert processes_using(run) == [], "the embedded server outlived the run"
    perf = json.loads((run / "perf.json").read_text())
    startup = perf["startup"]
    phases = startup["phases_s"]
    for phase in ("lightning imports", "model build", "first batch", "first step"):
        assert phases[phase] >= 0, phase
    assert 0 < startup["to_first_step_s"] < 300
    # The server and the tokenizer got ready in the background, while Lightning imported.
    background = set(startup["background_ready_s"])
    assert background == {"stream server", "tokenizer and validation samples"}
    assert perf["peak_rss_mb"]["trainer"] > 100 and perf["peak_rss_mb"]["server"] > 10
    assert "peak memory: trainer" in done.stdout


def test_a_bad_tokenizer_file_fails_in_one_line_from_the_background_head_start(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    done = train(tmp_path / "run", "tokenizer=pretrained", f"tokenizer.path={bad}", *SMALL[:3])
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert f"{bad} is not a Hugging Face tokenizer.json" in output
    assert "Traceback" not in output
    assert processes_using(tmp_path / "run") == [], "the embedded server outlived the run"


@pytest.mark.slow
def test_a_two_job_multirun_gives_two_folders_and_two_wandb_runs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "optimizer.lr=1e-3,3e-4",
        "model=babygpt-tiny",
        f"hydra.sweep.dir={sweep}",
        "debug=default",
        *SMALL,
    ]
    done = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_API_KEY": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = [next((job / "wandb").glob("offline-run-*")) for job in jobs]
    assert runs[0].name.split("-")[-1] != runs[1].name.split("-")[-1], "two W&B runs, not one"
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").exists()
    lrs = [config_updates(r)[0]["optimizer"]["lr"] for r in runs]
    assert lrs == [1e-3, 3e-4], "each job's own config"
    names = [run_info(r)["display_name"] for r in runs]
    assert names[0].startswith("babygpt-tiny lr=0.001") and names[1].startswith("babygpt-tiny lr=")


def read_batches(run: Path) -> dict[int, dict]:
    lines = (run / "batches-rank0.jsonl").read_text().splitlines()
    return {row["batch"]: row for row in map(json.loads, lines)}


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_wandb_run_step_and_data(tmp_path):
    common = [
        "trainer.max_steps=12",
        "trainer.val_every=4",
        "callbacks.checkpoint_every=4",
        "callbacks.sample_every=4",
        "data.stream.log_batches=true",
        *SMALL,
    ]
    reference = tmp_path / "reference"
    assert train(reference, *common).returncode == 0
    run = tmp_path / "run"
    proc = start(run, *common, small=False)
    wait_for(lambda: list((run / "checkpoints").glob("step=0000008*.ckpt")), proc, "step 8")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "killed mid-run, not finished"
    assert max(read_batches(run)) < 12
    deadline = time.monotonic() + 30  # the kernel ends the server on its trainer's death
    while processes_using(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(run) == [], "the embedded server died with its trainer"
    done = train(run, *common, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume=auto: continuing from" in (run / "train.log").read_text()
    ids = {p.name.split("-")[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, f"one W&B run id across the resume, got {ids}"
    want, got = read_batches(reference), read_batches(run)
    assert max(got) == 12
    for step in range(9, 13):
        assert got[step]["x"] == want[step]["x"] and got[step]["ids"] == want[step]["ids"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layr=2", "error: unknown key model.n_layr (model has: vocab_size, context,"),
        ("+model.n_layr=2", "error: unknown key model.n_layr (model has: vocab_size, context,"),
        ("++model.n_layr=2", "error: unknown key model.n_layr (model has: vocab_size, context,"),
        ("+trainer.kwargs.detect_anomaly=true", None),  # free-form: any Trainer argument
        ("data.stream.batchsize=4", "error: unknown key data.stream.batchsize (data.stream has: "),
        ("+wandb=1", "error: unknown key wandb (the config has: model, optimizer, data,"),
        ("server.source.paths=[x]", "error: unknown key server.source.paths (server.source has:"),
        ("model=gpt5", "error: model=gpt5: no such option (model is one of: babygpt, babygpt-tiny"),
        ("optimizer=adam,lion", "error: optimizer=adam: no such option (optimizer is one of"),
        ("source=files", "error: source=files: choose it with source@server.source=files"),
    ],
)
def test_a_misspelt_key_or_option_is_refused_in_one_line_naming_what_exists(override, message):
    done = subprocess.run(
        [sys.executable, "train.py", override, "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if message is None:  # accepted: Hydra composes it
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1


def test_help_lists_the_groups_as_a_user_types_them():
    done = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "source@server.source=shakespeare|files|fineweb" in done.stdout
    assert "model=speedrun-tiny|babygpt|babygpt-tiny|gpt2-small|streaming_tutorial" in done.stdout
    assert "precision=32-true|" in done.stdout and "hparams_search=null|optuna" in done.stdout
    assert "_schema" not in done.stdout
    assert "130 / 143" in done.stdout  # the exit codes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.stream.url=ws://127.0.0.1:9/ws", "logger=none"],
            "no stream server at ws://127.0.0.1:9/ws",
        ),
        (["model.n_heads=5"], "model.d_model=128 is not divisible by model.n_heads=5"),
        (["data.stream.max_length=256"], "data.stream.max_length=256 exceeds model.context=128"),
        (["resume=auto", "ckpt_path=x.ckpt"], "resume=auto and ckpt_path both"),
        (["precision=16-mixed", "trainer.accelerator=cpu"], "precision=16-mixed needs a GPU"),
        (["source@server.source=files"], "server.source.paths has no value"),
        (["server.source.validation_docs=-1"], "server.source.validation_docs must be >= 0"),
    ],
)
def test_a_bad_command_exits_nonzero_with_one_clear_line(tmp_path, overrides, message):
    done = train(tmp_path / "run", *overrides, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_runs_two_steps_end_to_end(tmp_path, experiment):
    run = tmp_path / "run"
    done = train(
        run,
        f"experiment={experiment}",
        "trainer.max_steps=2",
        "trainer.val_every=2",
        "callbacks.sample_every=2",
        "callbacks.checkpoint_every=2",
        "logger=csv",
        *SMALL,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "samples" / "iter_2" / "manual_1.txt").read_text().startswith("Steven")


def test_the_optuna_study_lives_in_the_project_whatever_the_working_directory(
    tmp_path, monkeypatch
):
    for cwd in (REPO, tmp_path):
        monkeypatch.chdir(cwd)
        cfg = compose_train(["hparams_search=optuna"])
        storage = OmegaConf.select(cfg, "hydra.sweeper.storage")
        assert storage == f"sqlite:///{REPO}/outputs/optuna.db"


@pytest.mark.slow
def test_an_optuna_search_rerun_from_elsewhere_adds_new_trials_each_its_own_wandb_run(tmp_path):
    import optuna

    project = tmp_path / "project"  # paths.root_dir: where outputs/optuna.db goes
    study = "lr-warmup-test"

    def search(cwd: Path, sweep: Path) -> subprocess.CompletedProcess:
        cwd.mkdir()
        return subprocess.run(
            [
                sys.executable,
                str(REPO / "train.py"),
                "hparams_search=optuna",
                "hydra.sweeper.n_trials=2",
                f"hydra.sweeper.study_name={study}",
                f"paths.root_dir={project}",
                f"hydra.sweep.dir={sweep}",
                "debug=default",
                "logger.wandb.mode=offline",
                *SMALL,
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "WANDB_API_KEY": ""},
        )

    storage = f"sqlite:///{project}/outputs/optuna.db"
    params = []
    for n, where in enumerate(("a", "b"), start=1):
        sweep = tmp_path / f"sweep-{where}"
        done = search(tmp_path / where, sweep)
        assert done.returncode == 0, done.stderr[-3000:]
        trials = optuna.load_study(study_name=study, storage=storage).trials
        assert len(trials) == 2 * n, "the second search continued the study"
        params.append([tuple(sorted(t.params.items())) for t in trials[-2:]])
        assert (sweep / "optimization_results.yaml").is_file()
        runs = [next((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")]
        infos = [run_info(r) for r in runs]
        assert infos[0]["run_id"] != infos[1]["run_id"], "each trial is its own W&B run"
        assert infos[0]["run_group"] == infos[1]["run_group"] == f"speedrun-tiny/sweep-{sweep.name}"
    assert not set(params[0]) & set(params[1]), f"the rerun proposed new parameters: {params}"
