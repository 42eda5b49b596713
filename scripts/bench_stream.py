"""What the live stream costs a training run: tokens/s fed from the stream vs from memory.

For each experiment (the CPU demo's `babygpt-tiny`, `experiment=streaming_tutorial`), the config is
composed as `train.py` composes it and trained by the same Trainer, callbacks and LitGPT twice
over: once from the live stream (embedded server process + StreamDataModule: requests, JSON,
tokenizer, packing), once from the very same batches already in memory as token tensors. Arms
alternate (stream, memory, stream, ...) so the host's drift hits both; the figure is the median
of the per-pair ratios of steady-state tokens/s (wall clock over the timed steps, after warm-up).

    python scripts/bench_stream.py [--experiments demo,streaming_tutorial] [--pairs 3]
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
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from streamgpt.app import build_trainer, start_embedded_server
from streamgpt.config import register_configs, validate
from streamgpt.data import StreamDataModule
from streamgpt.lit_module import LitGPT

REPO = Path(__file__).resolve().parents[1]
# experiment name -> (overrides, warm-up steps, timed steps)
EXPERIMENTS = {
    "demo": ([], 5, 40),
    "streaming_tutorial": (["experiment=streaming_tutorial"], 2, 10),
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
    """Wall-clock time at the end of every training step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


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

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], like: StreamDataModule):
        super().__init__()
        self.batches = batches
        self.tokenizer, self.vocab_size, self.eos_id = like.tokenizer, like.vocab_size, like.eos_id

    def train_dataloader(self):
        return Batches(self.batches)


def compose_run(overrides: list[str], run_dir: Path):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *QUIET, f"paths.output_dir={run_dir}"])
    validate(cfg)
    return cfg


def fit(cfg, run_dir: Path, datamodule, steps: int) -> StepClock:
    L.seed_everything(cfg.seed)
    model_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "compile"}
    model = LitGPT(model_cfg, OmegaConf.to_container(cfg.optimizer), compile=cfg.model.compile)
    cfg = OmegaConf.merge(cfg, {"trainer": {"max_steps": steps}})
    trainer = build_trainer(cfg, run_dir, [], validation=False)
    clock = StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=datamodule)
    return clock


def tokens_per_s(clock: StepClock, warmup: int, tokens_per_step: int) -> float:
    ends = clock.ends[warmup - 1 :]
    return tokens_per_step * (len(ends) - 1) / (ends[-1] - ends[0])


def bench(name: str, pairs: int) -> dict:
    overrides, warmup, timed = EXPERIMENTS[name]
    steps = warmup + timed
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        run_dir = Path(tmp)
        cfg = compose_run(overrides, run_dir)
        server = start_embedded_server(cfg, run_dir)
        try:
            stream = OmegaConf.merge(cfg.data.stream, {"url": [server.url]})
            prepared = StreamDataModule(stream, cfg.tokenizer, run_dir)
            prepared.setup()  # trains the run's tokenizer once; every arm loads it
            batches = []
            for batch in prepared.train_dataloader():
                batches.append(prepared.on_before_batch_transfer(batch, 0))
                if len(batches) == steps:
                    break
            tokens = batches[0][0].numel()
            rows = []
            for _ in range(pairs):
                live = StreamDataModule(stream, cfg.tokenizer, run_dir)
                s = tokens_per_s(fit(cfg, run_dir, live, steps), warmup, tokens)
                memory = MemoryData(batches, prepared)
                m = tokens_per_s(fit(cfg, run_dir, memory, steps), warmup, tokens)
                rows.append({"stream": s, "memory": m, "ratio": s / m})
                print(f"  {name}: stream {s:.0f} tokens/s, memory {m:.0f}: {s / m:.3f}", flush=True)
        finally:
            server.stop()
    return {
        "experiment": name,
        "batch": list(batches[0][0].shape),
        "vocab": prepared.vocab_size,
        "pairs": rows,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--pairs", type=int, default=3, help="stream/memory pairs per experiment")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = [bench(name, args.pairs) for name in args.experiments.split(",")]
    print("\n| experiment | batch | stream tokens/s | memory tokens/s | stream / memory |")
    print("|---|---|---|---|---|")
    for r in results:
        s = statistics.median(p["stream"] for p in r["pairs"])
        m = statistics.median(p["memory"] for p in r["pairs"])
        batch = "x".join(map(str, r["batch"]))
        print(f"| {r['experiment']} | {batch} | {s:.0f} | {m:.0f} | **{r['median_ratio']:.3f}** |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
