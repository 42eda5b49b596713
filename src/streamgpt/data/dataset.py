"""The training stream of one rank as a torch IterableDataset: each DataLoader worker (or the
main process) is one consumer (consumer.py), disjoint from every other and deterministic. With
elastic data (elastic.py) a consumer reads several canonical streams and assembles each
micro-batch from the streams it is made of."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset, get_worker_info

from streamgpt.data.consumer import ConsumerFeed, StepStages
from streamgpt.data.elastic import Layout
from streamgpt.data.packing import Encoder
from streamgpt.data.tokens_on_wire import WireTokens


class StreamDataset(IterableDataset):
    """Training batches for one rank; each DataLoader worker (or the main process) is a consumer."""

    def __init__(
        self,
        *,
        urls: list[str],
        cfg: Any,
        tokenizer_json: str,
        server_eot: str,
        eos_token: str,
        token: str | None,
        rank: int,
        world_size: int,
        states: dict[int, dict[str, Any]],
        phase: int = 0,
        layout: Layout | None = None,
        first: int = 0,
        step_stages: tuple[int, ...] | None = None,
        accumulate: int = 1,
    ) -> None:
        """`states`: by consumer (or by canonical stream, with a `layout`), the state after its
        last trained batch. `phase` (per-consumer streams) and `first` (elastic: this rank's
        micro-batch the DataLoader starts at) place a resumed run's workers."""
        super().__init__()
        self.urls = urls
        self.cfg = cfg
        self.tokenizer_json = tokenizer_json
        self.server_eot = server_eot
        self.eos_token = eos_token
        self.token = token
        self.rank = rank
        self.world_size = world_size
        self.states = states
        self.phase = phase
        self.layout = layout
        self.first = first
        self.step_stages = step_stages
        self.accumulate = accumulate

    def consumer(self, worker: int, num_workers: int) -> dict[str, Any]:
        # After a resume, worker process j plays consumer (j + phase) % N, so that the DataLoader's
        # round robin over workers yields batches in the order the interrupted run would have.
        local = (worker + self.phase) % num_workers
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": local,
            "num_workers": num_workers,
            "seed": self.cfg.seed,
            "epoch": 0,
            "split": "train",
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        encode = Encoder(Tokenizer.from_str(self.tokenizer_json), self.server_eot, self.eos_token)
        wire = WireTokens(self.tokenizer_json, self.eos_token) if self.cfg.tokens_on_wire else None
        if self.layout is not None:
            yield from self._elastic(worker, num_workers, encode, wire)
            return
        consumer = self.consumer(worker, num_workers)
        k = self.rank * num_workers + consumer["worker"]
        feed = ConsumerFeed(
            self.urls[k % len(self.urls)],
            consumer,
            self.cfg,
            encode,
            self.token,
            self.states.get(k),
            stages=self._stages(consumer["worker"], num_workers),
            wire=wire,
        )
        yield from feed

    def _stages(self, worker: int, of: int) -> StepStages | None:
        """A mixture's step stages for the feed that makes every `of`-th micro-batch of its rank
        from the worker-th (a canonical stream: every phases-th step from its phase's)."""
        if not self.step_stages:
            return None
        if self.layout is not None:
            return StepStages.of_worker(self.step_stages, 1, worker, of)
        return StepStages.of_worker(self.step_stages, self.accumulate, worker, of)

    def _elastic(
        self,
        worker: int,
        num_workers: int,
        encode: Callable[[list[str]], list[list[int]]],
        wire: WireTokens | None,
    ) -> Iterator[dict[str, Any]]:
        """This worker's micro-batches (first+worker, first+worker+W, ...), each the next rows of
        the canonical streams it is made of, in stream order."""
        layout = self.layout
        assert layout is not None
        feeds = {
            u: ConsumerFeed(
                self.urls[u % len(self.urls)],
                layout.consumer(u, self.cfg.seed),
                self.cfg,
                encode,
                self.token,
                self.states.get(u),
                rows=layout.rows,
                stages=self._stages(*layout.phase_of(u)),
                wire=wire,
            )
            for u in layout.units_of_worker(self.rank, worker, self.first)
        }
        for feed in feeds.values():
            feed.start()  # every stream reads ahead from the start
        rows = {u: iter(feed) for u, feed in feeds.items()}
        i = self.first + worker
        try:
            while True:
                parts = []
                for u in layout.units_of_micro_batch(self.rank, i):
                    part = next(rows[u], None)
                    if part is None:  # a stream ended: so does the data of this step
                        return
                    parts.append((u, part))
                yield {
                    "x": torch.cat([p["x"] for _, p in parts]),
                    "y": torch.cat([p["y"] for _, p in parts]),
                    "ids": [sid for _, p in parts for sid in p["ids"]],
                    "consumer": self.rank * num_workers + worker,
                    "units": {u: p["state"] for u, p in parts},
                    "unit_ids": {u: p["ids"] for u, p in parts},
                    "last": any(p.get("last", False) for _, p in parts),
                    "components": sum(
                        (Counter(p.get("components", {})) for _, p in parts), Counter()
                    ),
                }
                i += num_workers
        finally:
            for feed in feeds.values():
                feed.close()


class FirstBatches(IterableDataset):
    """The first `n` batches of a rank's stream, then the same ones over and over
    (data.stream.overfit_batches, debug=overfit): a model that cannot drive their loss towards
    zero is broken. They carry no stream state, so a resume starts again from the same batches."""

    def __init__(self, stream: StreamDataset, n: int) -> None:
        super().__init__()
        self.stream = stream
        self.n = n

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        feed = iter(self.stream)
        try:
            batches = [(b["x"], b["y"]) for b in itertools.islice(feed, self.n)]
        finally:
            feed.close()  # stops the consumer's thread and connection
        while batches:
            yield from batches
