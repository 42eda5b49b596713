"""Elastic determinism: the same global batches whatever the number of consumers.

With `data.stream.elastic.streams=C` and `.phases=M`, the run's data is defined by C x M canonical
streams, not by its consumers. Canonical stream u = p*C + c (c < C, p < M) is the server's consumer
u of C*M (its own order, cursor and packer), cut into rows of max_length tokens. Optimizer step s
trains `G/C` rows from each of the C streams of phase s mod M, G being the global batch
(batch_size x devices x num_nodes x accumulate_grad_batches). So the sequences of every step are
fixed by (corpus, seed, C, M, G) alone.

Physical consumers divide the canonical streams among them. Rank r of R trains, in its a-th
micro-batch of a step (of A), the streams with c = r (mod R) and (c // R) = a (mod A): C/(R*A)
streams of G/C rows, batch_size rows in all. Its DataLoader hands out micro-batch i from worker
i mod W (counted from the first micro-batch after a (re)start), so worker w reads the streams of
the micro-batches w, w+W, ...; these are the same streams at every step of their phase when W
divides M*A. A checkpoint keeps every canonical stream's cursor and untrained tokens, so a resume
may divide them among other R, W and A, as long as G stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Layout:
    """The canonical streams (C, M, G) and the consumers reading them (R ranks, A, W)."""

    streams: int  # C: canonical streams in every step
    phases: int  # M: groups of C streams, used in turn, one per step
    global_batch: int  # G: sequences per optimizer step
    ranks: int  # R
    accumulate: int  # A
    workers: int  # W: consumers per rank (DataLoader workers, or 1)

    @property
    def units(self) -> int:
        return self.streams * self.phases

    @property
    def rows(self) -> int:
        """Sequences each canonical stream gives to a step of its phase."""
        return self.global_batch // self.streams

    def problem(self) -> str | None:
        """Why these consumers cannot read these canonical streams exactly, or None."""
        C, M, G, R, A, W = (
            self.streams,
            self.phases,
            self.global_batch,
            self.ranks,
            self.accumulate,
            self.workers,
        )
        where = (
            f"data.stream.elastic.streams={C}, phases={M}, global batch {G} "
            f"(batch_size x devices x num_nodes x accumulate_grad_batches), {R} ranks x "
            f"accumulate {A}, {W} workers per rank"
        )
        if C % (R * A):
            return (
                f"elastic data: ranks x accumulate_grad_batches = {R * A} does not divide the "
                f"{C} canonical streams ({where}); use a divisor of {C}"
            )
        if G % C:
            return (
                f"elastic data: the global batch {G} is not a multiple of the {C} canonical "
                f"streams ({where}); each stream gives G/C sequences to a step"
            )
        if (M * A) % W:
            return (
                f"elastic data: {W} workers per rank do not divide phases x accumulate = "
                f"{M * A} ({where}); use data.stream.num_workers dividing {M * A}"
            )
        return None

    def units_of_micro_batch(self, rank: int, i: int) -> list[int]:
        """The canonical streams of rank `rank`'s micro-batch i (counted from the run's start)."""
        step, a = divmod(i, self.accumulate)
        phase = step % self.phases
        span = self.ranks * self.accumulate
        return [phase * self.streams + c for c in range(rank + self.ranks * a, self.streams, span)]

    def rank_of(self, unit: int) -> int:
        """The rank that reads canonical stream `unit`."""
        return unit % self.streams % self.ranks

    def phase_of(self, unit: int) -> tuple[int, int]:
        """(its phase, the phases): a canonical stream gives rows to steps p, p+M, p+2M, ..."""
        return unit // self.streams, self.phases

    def units_of_worker(self, rank: int, worker: int, first: int) -> list[int]:
        """The canonical streams a worker reads, when the rank's DataLoader starts at micro-batch
        `first`: those of micro-batches first+worker, first+worker+W, ... (a period of M*A)."""
        period = self.phases * self.accumulate
        return sorted(
            {
                u
                for j in range(period)
                for u in self.units_of_micro_batch(rank, first + worker + j * self.workers)
            }
        )

    def consumer(self, unit: int, seed: int) -> dict[str, Any]:
        """The server consumer that is canonical stream `unit`."""
        return {
            "rank": unit,
            "world_size": self.units,
            "worker": 0,
            "num_workers": 1,
            "seed": seed,
            "epoch": 0,
            "split": "train",
        }


def world_of(trainer: Any) -> int | None:
    """devices x num_nodes from the trainer config, when it says (not for every GPU: auto, -1)."""
    devices = trainer.devices
    if devices == "auto":  # Lightning takes 1 CPU, or every GPU
        cpu = trainer.accelerator == "cpu" or not torch.cuda.is_available()
        return trainer.num_nodes if cpu else None
    if isinstance(devices, str):  # a string of device ids
        return None
    count = devices if isinstance(devices, int) else len(devices)
    if count < 1:  # -1: every device there is
        return None
    return count * trainer.num_nodes


def check_config(cfg: Any) -> None:
    """Refuse, in one line before anything starts, a topology the elastic streams cannot serve
    exactly (the data module checks again with the real world size)."""
    elastic = cfg.data.stream.elastic
    if not elastic.streams:
        return
    for key in ("streams", "phases"):
        value = elastic[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"data.stream.elastic.{key}={value!r}: must be a positive whole number "
                "(elastic.streams=0 turns elastic data off)"
            )
    if cfg.data.stream.overfit_batches:
        raise ValueError(
            "data.stream.overfit_batches and data.stream.elastic.streams do not go together: "
            "overfitting repeats the first batches; set data.stream.elastic.streams=0"
        )
    world = world_of(cfg.trainer)
    if world is None:
        return
    accumulate = cfg.trainer.accumulate_grad_batches
    layout = Layout(
        streams=elastic.streams,
        phases=elastic.phases,
        global_batch=cfg.data.stream.batch_size * world * accumulate,
        ranks=world,
        accumulate=accumulate,
        workers=max(1, cfg.data.stream.num_workers),
    )
    problem = layout.problem()
    if problem:
        raise ValueError(problem)


def first_micro_batch(state: dict[str, Any], now: dict[str, int], accumulate: int) -> int:
    """Where a rank's micro-batches continue from an elastic checkpoint's data `state`, with this
    run's canonical streams `now` and accumulation: the checkpoint's step, at any topology that
    divides the same streams. Refuses, naming why, data that would not continue exactly."""
    then = state["elastic"]
    if now != then:
        changed = ", ".join(f"{k} {then[k]} -> {now[k]}" for k in now if now[k] != then.get(k))
        raise ValueError(
            f"the checkpoint's data is canonical streams {then} and this run's would be "
            f"{now} ({changed}): the global batch (batch_size x devices x num_nodes x "
            "accumulate_grad_batches), max_length, seed and data.stream.elastic must stay "
            "the same for the data to continue exactly"
        )
    trained = max(state["batches"].values(), default=0)
    if state["accumulate"] == accumulate:
        return trained  # even within a step, as a run of the same accumulation would
    steps, partial = divmod(trained, state["accumulate"])
    if partial:
        raise ValueError(
            f"the checkpoint was saved after {partial} of {state['accumulate']} accumulated "
            "micro-batches of a step; resume it with the same trainer.accumulate_grad_batches, "
            "or from a checkpoint saved at the end of a step (every periodic checkpoint is)"
        )
    return steps * accumulate
