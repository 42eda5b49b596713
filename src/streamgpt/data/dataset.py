"""The training stream of one rank as a torch IterableDataset: each DataLoader worker (or the
main process) is one consumer (consumer.py), disjoint from every other and deterministic."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from tokenizers import Tokenizer
from torch.utils.data import IterableDataset, get_worker_info

from streamgpt.data.consumer import ConsumerFeed, StepStages
from streamgpt.data.packing import Encoder


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
        step_stages: Callable[[int, int], StepStages] | None = None,  # (worker, num_workers)
    ) -> None:
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
        self.step_stages = step_stages

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
        consumer = self.consumer(worker, num_workers)
        k = self.rank * num_workers + consumer["worker"]
        encode = Encoder(Tokenizer.from_str(self.tokenizer_json), self.server_eot, self.eos_token)
        feed = ConsumerFeed(
            self.urls[k % len(self.urls)],
            consumer,
            self.cfg,
            encode,
            self.token,
            self.states.get(k),
            self.step_stages(consumer["worker"], num_workers) if self.step_stages else None,
        )
        yield from feed


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
