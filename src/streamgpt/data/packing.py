"""Tokens of consecutive samples packed into training windows.

Windows of max_length+1 tokens with stride max_length, so every adjacent pair of tokens is
trained exactly once; documents are separated by the end-of-text token; no padding, nothing
dropped. The packer's state (tokens and sample ids not yet trained, and the sample in progress)
goes into checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer


class TokenPacker:
    """Tokens of consecutive samples, cut into (x, y) batches of shape (batch_size, max_length)."""

    def __init__(self, batch_size: int, max_length: int, state: dict[str, Any] | None = None):
        self.batch_size = batch_size
        self.max_length = max_length
        self.need = batch_size * max_length + 1
        self._parts: list[np.ndarray] = []
        self._size = 0
        self._starts: list[tuple[int, str]] = []  # (token offset, sample id) not yet in a batch
        # The sample the buffer's first tokens belong to: it started in an earlier batch. None in
        # a fresh packer, and in a state saved before it was kept.
        self._current: str | None = None
        if state is not None:
            tokens = state["tokens"]
            tokens = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
            if tokens.size:
                self._parts.append(tokens.astype(np.int32))
                self._size = int(tokens.size)
            self._starts = [(int(o), str(i)) for o, i in state["ids"]]
            self._current = state.get("current")

    def add(self, sample_ids: list[str], token_lists: Sequence[Sequence[int]]) -> None:
        for sample_id, ids in zip(sample_ids, token_lists, strict=True):
            if len(ids) == 0:  # a list, or a token frame's array
                continue
            self._starts.append((self._size, sample_id))
            self._parts.append(np.asarray(ids, dtype=np.int32))
            self._size += len(ids)

    def ready(self) -> bool:
        return self._size >= self.need

    def pop(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The next batch (int64 arrays of shape (batch_size, max_length)) and the ids of the
        samples whose first token is in it."""
        tokens = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        stride = self.batch_size * self.max_length
        window = tokens[: self.need].astype(np.int64)
        x = window[:-1].reshape(self.batch_size, self.max_length)
        y = window[1:].reshape(self.batch_size, self.max_length)
        # The last target token is also the first input token of the next batch.
        rest = tokens[stride:]
        self._parts, self._size = [rest], int(rest.size)
        ids = [i for o, i in self._starts if o < stride]
        self._starts = [(o - stride, i) for o, i in self._starts if o >= stride]
        if ids:
            self._current = ids[-1]
        return x, y, ids

    def components(self) -> dict[str, int]:
        """The input tokens of the next batch (the one pop() returns; call this first) by the
        component of the sample each belongs to: the part of its id before the first "/", as in
        a mixture's `<component>/<id>`. Tokens of a sample in progress whose id an old state did
        not keep count under ""."""
        stride = self.batch_size * self.max_length
        counts: dict[str, int] = {}
        offset, sample = 0, self._current or ""
        for start, sample_id in self._starts:
            if start >= stride:
                break
            if start > offset:
                name = sample.partition("/")[0]
                counts[name] = counts.get(name, 0) + start - offset
            offset, sample = start, sample_id
        name = sample.partition("/")[0]
        counts[name] = counts.get(name, 0) + stride - offset
        return counts

    def state(self) -> dict[str, Any]:
        tokens = np.concatenate(self._parts) if self._parts else np.empty(0, np.int32)
        return {
            "tokens": tokens.astype(np.int32),
            "ids": list(self._starts),
            "current": self._current,
        }


def windows(packer: TokenPacker) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every full (x, y) batch a packer holds."""
    xs, ys = [], []
    while packer.ready():
        x, y, _ = packer.pop()
        xs.append(x)
        ys.append(y)
    return xs, ys


def component_windows(
    ids: list[str], token_lists: list[list[int]], names: list[str], max_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mixture's validation samples in windows of one sequence: each component's samples packed
    on their own (x, y, and the window's component index into `names`), then the rest of every
    component (a tail shorter than a window, a component too small for one) packed together, with
    index -1: those windows count in val/loss but in no component's. An id's component is its
    part before the first "/"."""
    index = {name: c for c, name in enumerate(names)}
    groups: list[tuple[list[str], list[list[int]]]] = [([], []) for _ in range(len(names) + 1)]
    for sample_id, tokens in zip(ids, token_lists, strict=True):
        group = groups[index.get(sample_id.partition("/")[0], -1)]
        group[0].append(sample_id)
        group[1].append(tokens)
    xs, ys, cs = [], [], []
    rest = TokenPacker(1, max_length)
    for c, (group_ids, group_tokens) in enumerate(groups[:-1]):
        packer = TokenPacker(1, max_length)
        packer.add(group_ids, group_tokens)
        x, y = windows(packer)
        xs, ys, cs = xs + x, ys + y, cs + [c] * len(x)
        rest.add([names[c]], [packer.state()["tokens"].tolist()])
    rest.add(*groups[-1])
    x, y = windows(rest)
    xs, ys, cs = xs + x, ys + y, cs + [-1] * len(x)
    if not xs:
        return np.empty((0, max_length), np.int64), np.empty((0, max_length), np.int64), np.empty(0)
    return np.concatenate(xs), np.concatenate(ys), np.asarray(cs, dtype=np.int64)


class Encoder:
    """Batch tokenization of streamed texts, mapping the server's end marker to our EOS token."""

    def __init__(self, tokenizer: Tokenizer, server_eot: str, eos_token: str):
        self.tokenizer = tokenizer
        self.replace = server_eot if server_eot and server_eot != eos_token else None
        self.eos_token = eos_token

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.replace:
            texts = [t.replace(self.replace, self.eos_token) for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
