"""What W&B holds after real runs, read back from the offline files with W&B's own reader:
every step's metrics, tables and images at the global step, one run across a resume, one config
record with the values the run used, the best val/loss, checkpoints as artifacts."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml
from hydra.types import RunMode

from streamgpt.loggers import run_names

from .helpers.runs import train
from .helpers.wandb_log import config_updates, history, records, run_info, summary

WANDB = ["logger=wandb", "logger.wandb.mode=offline", "trainer.progress_bar=true"]


def steps_of(rows: list[dict]) -> list[int]:
    return [row["_step"] for row in rows]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """`debug=default` (6 steps), then `resume=auto trainer.max_steps=12` in the same folder."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    first = train(run, "debug=default", *WANDB)
    second = train(run, "debug=default", *WANDB, "resume=auto", "trainer.max_steps=12")
    return run, first, second


@pytest.mark.slow
def test_every_step_is_in_wandb_at_its_global_step_across_a_resume(resumed):
    run, first, second = resumed
    for done in (first, second):
        assert done.returncode == 0, done.stderr[-3000:]
        printed = done.stdout + done.stderr
        assert (
            "Tried to log to step" not in printed and "Steps must be monotonically" not in printed
        )
    # `wandb sync <run>/wandb/offline-run-*` uploads the folders in this (start-time) order.
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    starts = [run_info(f)["start_time"] for f in folders]
    assert starts == sorted(starts)
    rows = [row for folder in folders for row in history(folder)]
    assert steps_of(rows) == list(range(1, 13)), "each step once, increasing across attempts"
    for row in rows:
        assert row["trainer/global_step"] == row["_step"]
        assert {"train/loss", "lr", "tokens_seen"} <= row.keys(), row["_step"]
    for folder, steps in zip(folders, [(3, 6), (9, 12)], strict=True):
        by_step = {row["_step"]: row for row in history(folder)}
        for step in steps:  # debug=default: validation, samples and the curve every 3 steps
            row = by_step[step]
            assert "val/loss" in row and "val/ppl" in row
            assert (folder / "files" / row["samples.path"]).is_file()
            for image in row["training_curve_LOSS.filenames"]:
                assert (folder / "files" / image).is_file()


@pytest.mark.slow
def test_a_resumed_run_is_one_wandb_run_with_its_first_name_and_every_attempt(resumed):
    run, _, _ = resumed
    folders = sorted((run / "wandb").glob("offline-run-*"))
    infos = [run_info(f) for f in folders]
    assert len({i["run_id"] for i in infos}) == 1
    assert len({i["display_name"] for i in infos}) == 1
    assert infos[0]["display_name"].startswith("speedrun-tiny d_model=64 n_layers=2")
    assert "max_steps" not in infos[1]["display_name"], "the resume keeps the first name"
    assert len({i["run_group"] for i in infos}) == 1
    # Hydra's files of the first attempt stay; the resume's are kept beside them.
    first = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    again = yaml.safe_load((run / ".hydra" / "attempt-2" / "overrides.yaml").read_text())
    assert "debug=default" in first and "resume=auto" not in first
    assert "resume=auto" in again and "trainer.max_steps=12" in again
    assert (run / ".hydra" / "attempt-2" / "environment.json").is_file()
    attempts = config_updates(folders[1])[0]["run"]["attempts"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["resumed_from_step"] is None and attempts[1]["resumed_from_step"] == 6
    assert "resume=auto" in attempts[1]["overrides"]


@pytest.mark.slow
def test_the_config_is_logged_once_nested_with_what_the_run_used(resumed):
    run, _, _ = resumed
    folder = sorted((run / "wandb").glob("offline-run-*"))[0]
    updates = config_updates(folder)
    assert len(updates) == 1, f"one config record, got {len(updates)}"
    config = updates[0]
    assert not {"compile", "model/params", "peak_flops_used"} & config.keys()
    model, facts = config["model"], config["run"]
    assert model["vocab_size"] == 512 and model["compile"] is False, model
    assert facts["tokenizer_vocab_size"] == 512
    assert facts["params"] > 50_000 and facts["flops_per_token"] > 6 * facts["params"]
    assert facts["world_size"] == 1 and facts["num_nodes"] == 1
    assert facts["global_batch"] == 8 and facts["tokens_per_step"] == 8 * 64
    assert facts["precision"] == "32-true"
    assert facts["peak_flops"] > 1e9 and "matmul probe" in facts["peak_flops_source"]
    # Muon's lr: the demo's optimizer
    assert config["optimizer"]["lr"] == 0.02 and config["data"]["stream"]["batch_size"] == 8


@pytest.mark.slow
def test_the_summary_holds_the_best_val_loss_and_its_step_beside_the_last(resumed):
    run, _, _ = resumed
    folders = sorted((run / "wandb").glob("offline-run-*"))
    rows = [row for folder in folders for row in history(folder) if "val/loss" in row]
    best = min(rows, key=lambda row: row["val/loss"])
    final = summary(folders[-1])
    assert final["val/loss_best"] == pytest.approx(best["val/loss"])
    assert final["val/loss_best_step"] == best["_step"]
    assert final["val/loss"] == pytest.approx(rows[-1]["val/loss"])


@pytest.mark.slow
def test_lightning_says_each_line_once_and_no_product_tips(resumed):
    _, first, second = resumed
    printed = first.stdout + first.stderr
    assert printed.count("GPU available:") == 1
    assert "Tip:" not in printed and "litlogger" not in printed
    assert "Epoch" not in printed and "v_num" not in printed
    assert re.search(r"train +━+ 6/6 ", first.stdout), "steps out of max_steps"
    assert re.search(r"train +━+ 12/12 ", second.stdout), "counting on from the resumed step"


@pytest.mark.slow
def test_log_model_uploads_the_checkpoints_as_artifacts_of_the_offline_run(tmp_path):
    run = tmp_path / "run"
    done = train(run, "debug=default", *WANDB, "logger.wandb.log_model=true")
    assert done.returncode == 0, done.stderr[-3000:]
    folder = next((run / "wandb").glob("offline-run-*"))
    models = [
        r["artifact"] for r in records(folder) if r.get("artifact", {}).get("type") == "model"
    ]
    assert models, "a model artifact"
    logged = {entry["path"] for m in models for entry in m["manifest"]["contents"]}
    assert logged == {"model.ckpt"}
    aliases = {alias for m in models for alias in m["aliases"]}
    assert {"latest", "best"} <= aliases


def job(task: list[str], *, mode=RunMode.RUN, sweep_dir="", **choices) -> SimpleNamespace:
    return SimpleNamespace(
        runtime=SimpleNamespace(
            choices={"model": "babygpt-tiny", "precision": "32-true", **choices}
        ),
        overrides=SimpleNamespace(task=task),
        mode=mode,
        sweep=SimpleNamespace(dir=sweep_dir),
    )


def test_run_names_are_the_model_or_experiment_and_the_few_overrides_that_differ():
    assert run_names(job([])) == ("babygpt-tiny", "babygpt-tiny")
    task = ["model=babygpt", "precision=bf16-mixed", "hydra.run.dir=x", "resume=auto"]
    assert run_names(job(task, model="babygpt"))[1] == "babygpt bf16-mixed"
    task = [
        "optimizer.lr=0.00123456789",
        "data.stream.url=ws://h:1/ws",
        "logger=csv",
        "debug=default",
    ]
    assert run_names(job(task, debug="default"))[1] == "babygpt-tiny lr=0.00123 debug"
    group, name = run_names(
        job(
            ["optimizer.lr=3e-4"],
            mode=RunMode.MULTIRUN,
            sweep_dir="m/2026-11-22_10-00-00",
            experiment="scaling_compute",
        )
    )
    assert group == "scaling_compute/sweep-2026-11-22_10-00-00"
    assert name == "scaling_compute lr=3e-4"
    long = run_names(job([f"optimizer.k{i}={i}" for i in range(40)]))[1]
    assert len(long) == 80 and long.endswith("…")
