"""The text to evaluate, packed into the token windows training validates on.

- The run's held-out split (default): <run>/validation.jsonl, tokenized and packed exactly as
  StreamDataModule does for validation (full windows only, the run's batches, as many of them as
  trainer.limit_val_batches let training validate), so the figures reproduce its last val/loss.
- Files: read into documents by the server's `files` source itself (same suffixes, fields, keys
  and `min_words`), each ended with the end-of-text token as the server's chunks end it.
- A stream: one whole epoch of a server's split, its chunks joined back into documents.

Files and streams are evaluated document by document in the order of their keys (a stream's
sample ids are `<key>#<chunk>`), so the same documents give the same figures whichever way they
come. Every token is a target, the first document's first one too (predicted after an
end-of-text token, as every other document's first token is, and as training sees them), and
their last, shorter window is evaluated: the bytes scored are all the text's, whatever the
tokenizer, so runs with different tokenizers are scored on exactly the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import torch
from tokenizers import Tokenizer

from streamgpt.data.client import Connection, StreamError, no_server, token_from_env
from streamgpt.data.packing import Encoder, TokenPacker
from streamgpt.server.corpus import Chunking
from streamgpt.server.sources.files import read_documents
from streamgpt.server.sources.indexed import keep_documents


@dataclass
class Windows:
    """Token windows to evaluate, in batches of (x, y), and where their text came from."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    source: dict[str, Any] = field(default_factory=dict)


def pack(token_lists: list[list[int]], max_length: int, keep_tail: bool) -> list[torch.Tensor]:
    """Windows of max_length + 1 tokens, stride max_length (training's packing); with
    `keep_tail`, the shorter window of what is left (at least 2 tokens) too."""
    packer = TokenPacker(1, max_length)
    packer.add([str(i) for i in range(len(token_lists))], token_lists)
    windows = []
    while packer.ready():
        x, y, _ = packer.pop()
        windows.append(torch.from_numpy(x[0]).long())
        windows[-1] = torch.cat([windows[-1], torch.from_numpy(y[0, -1:]).long()])
    rest = packer.state()["tokens"]
    if keep_tail and rest.size >= 2:
        windows.append(torch.from_numpy(rest.astype("int64")))
    return windows


def batch(windows: list[torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of up to `batch_size` windows of one length, in order."""
    out = []
    i = 0
    while i < len(windows):
        n = len(windows[i])
        group = [w for w in windows[i : i + batch_size] if len(w) == n]
        stacked = torch.stack(group)
        out.append((stacked[:, :-1], stacked[:, 1:]))
        i += len(group)
    return out


def limit_batches(n: int, limit: Any) -> int:
    """How many of n validation batches Lightning runs for trainer.limit_val_batches."""
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(n, limit)  # a number of batches
    if limit is None or limit >= 1.0:
        return n
    return max(1, int(n * limit)) if limit > 0 else 0  # a fraction of them


def held_out(
    run_dir: Path, tokenizer: Tokenizer, eos: str, server_eot: str, run: dict[str, Any]
) -> Windows:
    """The run's validation samples, in the windows and batches training validated on."""
    path = run_dir / "validation.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no validation.jsonl (trained with data.stream.valid_size=0?): give "
            "the text to evaluate with data.files=[...] or data.url=ws://..."
        )
    samples = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    tokens = Encoder(tokenizer, server_eot, eos)([s["text"] for s in samples])
    windows = pack(tokens, run["max_length"], keep_tail=False)
    if not windows:
        raise ValueError(f"{path} holds fewer than max_length + 1 = {run['max_length'] + 1} tokens")
    batches = batch(windows, run["batch_size"])
    batches = batches[: limit_batches(len(batches), run["limit_val_batches"])]
    return Windows(batches, {"kind": "validation", "path": str(path), "samples": len(samples)})


def documents(
    keyed: list[tuple[str, str]], tokenizer: Tokenizer, eos: str, max_length: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, text ending with the eos token) documents, in key order, after an eos token (so
    the first token is a target too), packed and batched."""
    texts = [text for _, text in sorted(keyed)]
    if not any(t.removesuffix(eos).strip() for t in texts):
        raise ValueError("the text to evaluate is empty")
    tokens = [[tokenizer.token_to_id(eos)]]
    tokens += [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return batch(pack(tokens, max_length, keep_tail=True), batch_size)


def from_files(
    cfg: Any, tokenizer: Tokenizer, eos: str, max_length: int, batch_size: int
) -> Windows:
    """Files read by the files source's own reader, each document ended as its last chunk is."""
    source = SimpleNamespace(
        paths=list(cfg.files), text_field=cfg.text_field, id_field=cfg.id_field
    )
    try:
        keys, texts = read_documents(source)
    except ValueError as e:  # its messages name the server's key
        raise ValueError(str(e).replace("source.", "data.")) from None
    try:
        keys, texts = keep_documents(keys, texts, cfg.min_words, "data.files")
    except ValueError:
        raise ValueError(
            f"the text to evaluate is empty: no document of data.files={list(cfg.files)} has "
            f"at least {cfg.min_words} word(s) (data.min_words)"
        ) from None
    chunking = Chunking(eot_marker=eos)
    keyed = [(k, "".join(chunking.split(t))) for k, t in zip(keys, texts, strict=True)]
    windows = documents(keyed, tokenizer, eos, max_length, batch_size)
    return Windows(windows, {"kind": "files", "paths": list(cfg.files), "documents": len(keys)})


def read_epoch(cfg: Any) -> list[tuple[str, str]]:
    """(sample id, text) of one whole epoch of the server's `split`, read as consumer 0 of 1."""
    consumer = {"rank": 0, "world_size": 1, "worker": 0, "num_workers": 1, "seed": 0}
    consumer |= {"epoch": 0, "split": cfg.split}
    conn = Connection(
        cfg.url,
        token=token_from_env(cfg.token_env),
        connect_timeout=cfg.timeout_s,
        recv_timeout=cfg.timeout_s,
    )
    try:
        conn.open(consumer)
    except (OSError, TimeoutError, ConnectionError) as e:
        raise StreamError(no_server(cfg.url, e)) from None
    samples: dict[str, str] = {}
    try:
        while True:
            conn.request(cfg.samples_per_request)
            reply = conn.receive_data()
            for sample_id, text in zip(reply.ids, reply.texts, strict=True):
                if sample_id in samples:  # the next epoch has begun: every sample seen once
                    return list(samples.items())
                samples[sample_id] = text
            if reply.ended:  # a finite stream, or the validation split read to its end
                return list(samples.items())
    except (OSError, TimeoutError, ConnectionError) as e:
        raise StreamError(f"lost the stream server at {cfg.url}: {e}") from None
    finally:
        conn.close()


def from_stream(
    cfg: Any, tokenizer: Tokenizer, eos: str, max_length: int, batch_size: int
) -> Windows:
    """One epoch of a stream, its chunks joined back into documents (ids `<key>#<chunk>`)."""
    chunks: dict[str, list[tuple[int, str]]] = {}
    for sample_id, text in read_epoch(cfg):
        key, sep, index = sample_id.rpartition("#")
        if not sep or not index.isdigit():  # not one of our ids: a document of its own
            key, index = sample_id, "0"
        chunks.setdefault(key, []).append((int(index), text))
    if not chunks:
        raise ValueError(f"the stream at {cfg.url} served no {cfg.split} samples")
    encode = Encoder(tokenizer, cfg.eot_marker, eos)
    keyed = [(k, "".join(t for _, t in sorted(c))) for k, c in chunks.items()]
    keyed = [(k, t.replace(encode.replace, eos) if encode.replace else t) for k, t in keyed]
    windows = documents(keyed, tokenizer, eos, max_length, batch_size)
    source = {"kind": "stream", "url": cfg.url, "split": cfg.split, "documents": len(chunks)}
    return Windows(windows, source)
