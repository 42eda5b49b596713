"""The data pipeline alone: tokens/s delivered as training batches (no model), in one run.

Our server (embedded corpus) feeds StreamDataModule with 1 consumer (the main process) and with 4
(DataLoader workers), each reading text with one stream per consumer, text with elastic data (32
canonical streams: 8 per step x 4 phases), and tokens on the wire (the server tokenizes); batches
are drawn as fast as they come. Reported: tokens/s,
the time to the first batch, and tokens per CPU-second of the client (JSON, tokenization,
packing: the cost a trainer host pays per core). Against it, in the same run: babygpt training
tokens/s on this CPU (fp32), and, on paper, what one H100 training babygpt at 40% MFU needs per
core of a 16-core host.

    python scripts/bench_pipeline.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from streamgpt.data import StreamConfig, StreamDataModule, TokenizerConfig
from streamgpt.data.config import ElasticConfig
from streamgpt.server.process import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import load_config

H100_BF16 = 989.5e12
BATCH, LENGTH = 64, 512  # babygpt / EIR tutorial 02
ELASTIC = ElasticConfig(streams=8, phases=4)  # up to 8 ranks x accumulation, 4 workers per rank
VARIANTS = {
    "text": "text, 1 stream per consumer",
    "elastic": f"text, {ELASTIC.streams * ELASTIC.phases} canonical streams",
    "tokens": "tokens on the wire",
}


def cpu_seconds(proc: psutil.Process, server_pid: int) -> float:
    """CPU seconds of this process and its children (DataLoader workers), not the server's."""
    server = psutil.Process(server_pid)
    skip = {server_pid, *(c.pid for c in server.children(recursive=True))}
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        if child.pid in skip:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that just exited
            total += sum(child.cpu_times()[:2])
    return total


def pipeline(
    server: ServerProcess, tokenizer: Path, consumers: int, variant: str, seconds: float
) -> dict:
    """Batches drawn as fast as they come for `seconds`; variant: "text", "elastic" or "tokens"."""
    url, server_pid = server.url, server.proc.pid
    run = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    shutil.copy(tokenizer, run / "tokenizer.json")
    cfg = StreamConfig(
        url=url,
        batch_size=BATCH,
        max_length=LENGTH,
        valid_size=0,
        num_workers=consumers if consumers > 1 else 0,
        prefetch_batches=8,
        elastic=ELASTIC if variant == "elastic" else ElasticConfig(),
        tokens_on_wire=variant == "tokens",
    )
    dm = StreamDataModule(cfg, TokenizerConfig(), run)
    dm.setup()
    me = psutil.Process()
    started = time.perf_counter()
    batches = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(batches), 0)
    first = time.perf_counter() - started
    cpu0, t0, tokens = cpu_seconds(me, server_pid), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        x, _ = dm.on_before_batch_transfer(next(batches), 0)
        tokens += x.numel()
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(me, server_pid) - cpu0
    if hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()
    shutil.rmtree(run)
    return {
        "consumers": consumers,
        "variant": VARIANTS[variant],
        "tokens_per_s": tokens / elapsed,
        "first_batch_s": first,
        "tokens_per_cpu_s": tokens / cpu,
    }


def babygpt_cpu_tokens_per_s(seconds: float) -> float:
    from streamgpt.model import GPT
    from streamgpt.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    model = GPT(load_config("babygpt"))
    optimizer = build_optimizer(model, OptimizerConfig(), "cpu")
    x = torch.randint(0, 8192, (4, LENGTH))
    steps, started = 0, None
    while started is None or time.perf_counter() - started < seconds or steps < 2:
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if started is None:
            started = time.perf_counter()  # the first step is a warm-up
        else:
            steps += 1
    return steps * x.numel() / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    quiet = ["log_every_s=3600", "hydra.run.dir=" + tempfile.mkdtemp(prefix="bench-serve-")]
    # Tokens on the wire tokenized on the fly, as BENCHMARKS measured them: the token cache's
    # build would take every core while the pipeline is measured (bench_server measures it).
    with ServerProcess([*quiet, "tokens.cache=false"]) as server:
        run = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
        setup = StreamDataModule(
            StreamConfig(url=server.url, valid_size=0, streaming_setup_samples=2000),
            TokenizerConfig(vocab_size=8192),
            run,
        )
        setup.prepare_data()  # the tokenizer babygpt would use: BPE 8192 on streamed text
        rows = [
            pipeline(server, run / "tokenizer.json", c, variant, args.seconds)
            for variant in VARIANTS
            for c in (1, 4)
        ]
    train_rate = babygpt_cpu_tokens_per_s(args.seconds)
    model = __import__("streamgpt.model", fromlist=["GPT"]).GPT(load_config("babygpt"))
    h100 = 0.40 * H100_BF16 / model.flops_per_token()
    per_core = h100 / 16

    print(f"\npipeline: batches of {BATCH} x {LENGTH} tokens from a live stream (no model)")
    print("| consumers | what | tokens/s | first batch s | tokens per client CPU-second |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['consumers']} | {r['variant']} | {r['tokens_per_s']:.0f} | "
            f"{r['first_batch_s']:.2f} | {r['tokens_per_cpu_s']:.0f} |"
        )
    for variant in ("elastic", "tokens"):
        for c in (1, 4):
            base, other = (
                next(r for r in rows if r["consumers"] == c and r["variant"] == VARIANTS[v])
                for v in ("text", variant)
            )
            speed = other["tokens_per_s"] / base["tokens_per_s"]
            cost = other["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
            print(
                f"{VARIANTS[variant]} with {c} consumer(s): {speed:.2f}x the tokens/s, "
                f"{cost:.2f}x the tokens per client CPU-second of text"
            )
    text = [r for r in rows if r["variant"] == VARIANTS["text"]]
    best = max(r["tokens_per_s"] for r in text)
    per_cpu = max(r["tokens_per_cpu_s"] for r in text)
    print(
        f"\nbabygpt trains at {train_rate:.0f} tokens/s on this CPU (fp32): the pipeline delivers "
        f"{best / train_rate:.0f}x that"
    )
    print(
        f"one H100 at 40% MFU trains babygpt at {h100 / 1e6:.2f} M tokens/s = "
        f"{per_core / 1e3:.0f} k tokens/s per core of a 16-core host; one client core delivers "
        f"{per_cpu / 1e3:.0f} k "
        f"({per_cpu / per_core:.1f}x)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "pipeline": rows,
                    "babygpt_cpu_tokens_per_s": train_rate,
                    "h100_tokens_per_s": h100,
                    "needed_per_core": per_core,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
