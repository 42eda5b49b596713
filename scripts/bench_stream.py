"""What the live stream costs a training run: tokens/s fed from the stream vs from memory.

For each experiment (the CPU demo, `experiment=streaming_tutorial`), the config is
composed as `train.py` composes it and trained by the same Trainer, callbacks and GPTModule twice
over: once from the live stream (embedded server process + StreamDataModule: requests, JSON,
tokenizer, packing), once from the very same batches already in memory as token tensors. After
one untimed warm-up fit, arms alternate (stream, memory, memory, stream, ...) so the host's drift
hits both; the figure is the median of the per-pair ratios of steady-state tokens/s (wall clock
over the timed steps, after warm-up). This host's speed drifts by tens of percent within a minute,
so each ratio is noisy; the CPU seconds the data path costs per step (the trainer's extra CPU in the
stream arm, plus the server's) are the steadier measure of the same overhead.

    python scripts/bench_stream.py [--experiments demo,streaming_tutorial] [--pairs 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import psutil
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from streamgpt.config import gpt_fields, register_configs, validate
from streamgpt.data import StreamDataModule
from streamgpt.data.stream_setup import StreamSetup
from streamgpt.flops import device_peak
from streamgpt.headstart import RunInputs, launch_embedded_server
from streamgpt.lit_module import GPTModule, pad_vocab
from streamgpt.malloc import allocator
from streamgpt.run import build_callbacks, build_trainer

REPO = Path(__file__).resolve().parents[1]
# experiment name -> (overrides, warm-up steps, timed steps)
EXPERIMENTS = {
    "demo": ([], 4, 16),
    "streaming_tutorial": (["experiment=streaming_tutorial"], 2, 4),
}
# Both arms: no validation, samples or checkpoints (the same in both arms, and not data).
QUIET = [
    "logger=none",
    "trainer.progress_bar=false",
    "data.stream.valid_size=0",
    "callbacks.sample_every=0",
    "callbacks.checkpoint_every=0",
    "+trainer.kwargs.enable_model_summary=false",
]


class StepClock(L.Callback):
    """At the end of every training step: wall clock, this process's CPU time (all threads) and
    the stream server's CPU time."""

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)
        self.ends: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, *args) -> None:
        server = self.server.cpu_times()
        self.ends.append((time.perf_counter(), time.process_time(), server.user + server.system))


class Batches:
    """An iterable of batches (a bare list would be taken for a list of dataloaders)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class MemoryData(L.LightningDataModule):
    """The same (x, y) batches, already token tensors in memory (and the same tokenizer)."""

    finite = False  # an endless stream, as the other arm's (StreamEndSync reads it)
    components = ()  # one source, as the other arm's (MixtureTokens reads it)

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return Batches(self.batches)


def compose_run(overrides: list[str], run_dir: Path):
    register_configs(REPO / "conf")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *QUIET, f"paths.output_dir={run_dir}"])
    validate(cfg)
    return cfg


def fit(cfg, run_dir: Path, datamodule, inputs: RunInputs, steps: int, server_pid: int):
    """One fit, built as train.py builds it (run.py's callbacks and Trainer)."""
    L.seed_everything(cfg.seed)
    tokenizer = inputs.setup.tokenizer()
    model_cfg = gpt_fields(OmegaConf.to_container(cfg.model))
    model_cfg["vocab_size"] = model_cfg["vocab_size"] or pad_vocab(tokenizer.get_vocab_size())
    model = GPTModule(model_cfg, OmegaConf.to_container(cfg.optimizer), compile=cfg.model.compile)
    cfg = OmegaConf.merge(cfg, {"trainer": {"max_steps": steps}})
    peak = device_peak("cpu", cfg.trainer.precision, cfg.peak_flops)
    callbacks = build_callbacks(
        cfg, run_dir, inputs, datamodule, tokenizer, peak, lambda: server_pid
    )
    trainer = build_trainer(cfg, run_dir, [], callbacks, validation=False)
    clock = StepClock(server_pid)
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=datamodule)
    return clock


def measure(clock: StepClock, warmup: int, tokens_per_step: int) -> dict:
    """Steady state: tokens/s, and CPU seconds per step of the trainer and of the server."""
    (w0, c0, s0), (w1, c1, s1) = clock.ends[warmup - 1], clock.ends[-1]
    steps = len(clock.ends) - warmup
    return {
        "tokens_per_s": tokens_per_step * steps / (w1 - w0),
        "trainer_cpu_s": (c1 - c0) / steps,
        "server_cpu_s": (s1 - s0) / steps,
        "step_s": (w1 - w0) / steps,
    }


def bench(name: str, pairs: int) -> dict:
    overrides, warmup, timed = EXPERIMENTS[name]
    steps = warmup + timed
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        run_dir = Path(tmp)
        cfg = compose_run(overrides, run_dir)
        allocator(cfg.trainer.malloc)  # as train.py does
        server = launch_embedded_server(cfg, run_dir).wait_ready()
        try:
            stream = OmegaConf.merge(cfg.data.stream, {"url": [server.url]})
            setup = StreamSetup(stream, cfg.tokenizer, run_dir)
            setup.prepare()  # trains the run's tokenizer once; every arm uses it
            inputs = RunInputs(stream, setup, checkpoint=None)
            prepared = StreamDataModule(stream, cfg.tokenizer, run_dir, setup=setup)
            prepared.setup()
            batches = []
            for batch in prepared.train_dataloader():
                batches.append(prepared.on_before_batch_transfer(batch, 0))
                if len(batches) == steps:
                    break
            tokens = batches[0][0].numel()
            # The process's first fit pays one-off costs (allocator, page faults, lazy inits).
            pid = server.proc.pid
            fit(cfg, run_dir, MemoryData(batches), inputs, warmup + 1, pid)
            rows = []
            for pair in range(pairs):
                arms = {}
                for arm in ("stream", "memory") if pair % 2 == 0 else ("memory", "stream"):
                    data = (
                        StreamDataModule(stream, cfg.tokenizer, run_dir, setup=setup)
                        if arm == "stream"
                        else MemoryData(batches)
                    )
                    clock = fit(cfg, run_dir, data, inputs, steps, pid)
                    arms[arm] = measure(clock, warmup, tokens)
                s, m = arms["stream"], arms["memory"]
                rows.append({**arms, "ratio": s["tokens_per_s"] / m["tokens_per_s"]})
                print(
                    f"  {name}: stream {s['tokens_per_s']:.0f} tokens/s, memory "
                    f"{m['tokens_per_s']:.0f}: {rows[-1]['ratio']:.3f}",
                    flush=True,
                )
        finally:
            server.stop()
    stream_cpu = statistics.median(r["stream"]["trainer_cpu_s"] for r in rows)
    memory_cpu = statistics.median(r["memory"]["trainer_cpu_s"] for r in rows)
    server_cpu = statistics.median(r["stream"]["server_cpu_s"] for r in rows)
    return {
        "experiment": name,
        "batch": list(batches[0][0].shape),
        "vocab": prepared.vocab_size,
        "pairs": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "ratios": sorted(r["ratio"] for r in rows),
        # What the stream costs in CPU, per training step: the trainer's extra (client thread:
        # receive, JSON, tokenize, pack) and the server's; against the step's own CPU time.
        "data_cpu_per_step_s": stream_cpu - memory_cpu + server_cpu,
        "step_cpu_s": memory_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--pairs", type=int, default=8, help="stream/memory pairs per experiment")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = [bench(name, args.pairs) for name in args.experiments.split(",")]
    print(
        "\n| experiment | batch | stream tokens/s | memory tokens/s | stream / memory, median "
        "(range) | data path CPU per step, trainer + server | share of the step's CPU |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        s = statistics.median(p["stream"]["tokens_per_s"] for p in r["pairs"])
        m = statistics.median(p["memory"]["tokens_per_s"] for p in r["pairs"])
        batch = "x".join(map(str, r["batch"]))
        low, high = r["ratios"][0], r["ratios"][-1]
        data, step = r["data_cpu_per_step_s"], r["step_cpu_s"]
        print(
            f"| {r['experiment']} | {batch} | {s:.0f} | {m:.0f} | **{r['median_ratio']:.3f}** "
            f"({low:.2f}-{high:.2f}) | {data * 1000:.1f} ms | {data / step:.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
