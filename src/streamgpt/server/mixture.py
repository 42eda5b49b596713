"""Weighted mixtures of sources (`source=mix`): which component each sample of a stream comes from.

Each component is a corpus of its own (shakespeare, files, fineweb), walked for a consumer by its
own stream: its own order, epochs, cursor and held-out split, exactly the stream that source alone
would serve that consumer, with `<component>/` before every sample id.

The schedule gives position t of a stream (counted from the stream's start) to the component
furthest behind its target, ties to the first listed: smooth weighted round robin (nginx's), the
largest-deficit rule. A component's target at t is the sum, over the stages t has passed through,
of its weight times the positions spent in that stage. Weights are exact fractions of the numbers
as written, scaled to integers, so the deficits are integers: the choice at a position is a pure
function of the position and of how many samples each component has given so far (the component
cursors' `n`). Batch sizes, threads and resumes cannot change it, and no prefix of a stream leaves
a component more than about one sample from its target, as a seeded draw would (its error grows as
the square root of the length).
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Callable
from fractions import Fraction
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from typing import Any

from streamgpt.server.corpus import Chunk, Chunking, fingerprint_of
from streamgpt.server.streams import (
    CURSOR_VERSION,
    NO_STEP_STAGES,
    ConsumerSpec,
    CursorError,
    Stream,
    StreamBase,
    check_cursor,
    open_stream,
)

# (components of the positions, samples each component gives, the interleaving function)
Picks = tuple[tuple[int, ...], tuple[int, ...], Callable[[list], list]]


class Schedule:
    """Stages of weights, and the component of every position under them.

    `weights` holds each stage's positive weights per component (normalised here); `segments` is
    [(from_position, stage)]: the stages a stream goes through, the first from position 0,
    positions in order. Stages that start from a sample have every stage in order; stages that
    start from a training step have the ones a stream switched to, where it did (`switched`).
    Targets and deficits are kept scaled by `scale`, the common denominator of every normalised
    weight, so all the arithmetic is exact.
    """

    def __init__(self, weights: list[list[float]], segments: list[tuple[int, int]]) -> None:
        exact = [[Fraction(str(w)) for w in row] for row in weights]
        shares = [[w / sum(row) for w in row] for row in exact]
        self.scale = math.lcm(*(s.denominator for row in shares for s in row))
        self.shares = tuple(tuple(int(s * self.scale) for s in row) for row in shares)
        # Blocks of picks by (stage, deficits, length): within a stage the deficits come back to
        # the same few values (0.8/0.2: five), so a client asking for one batch size hits this.
        self._block = lru_cache(maxsize=4096)(self._compute_block)
        self._follow(segments)

    def _follow(self, segments: list[tuple[int, int]]) -> None:
        self.starts = tuple(start for start, _ in segments)
        self.stages = tuple(stage for _, stage in segments)
        # Scaled targets at each segment's start.
        self._bases = [tuple(0 for _ in self.shares[0])]
        for i in range(1, len(self.starts)):
            length = self.starts[i] - self.starts[i - 1]
            prev, shares_prev = self._bases[-1], self.shares[self.stages[i - 1]]
            self._bases.append(
                tuple(b + w * length for b, w in zip(prev, shares_prev, strict=True))
            )

    def switched(self, switches: list[tuple[int, int]]) -> Schedule:
        """This schedule, then stage s from position p on for each (s, p) in `switches` (a
        stream's switches to stages that start from a step). Shares the cache of blocks."""
        if not switches:
            return self
        other = copy.copy(self)
        other._follow([*zip(self.starts, self.stages, strict=True), *((p, s) for s, p in switches)])
        return other

    def segment_at(self, position: int) -> int:
        return bisect.bisect_right(self.starts, position) - 1

    def stage_at(self, position: int) -> int:
        return self.stages[self.segment_at(position)]

    def weights_at(self, position: int) -> tuple[float, ...]:
        return self.weights(self.stage_at(position))

    def weights(self, stage: int) -> tuple[float, ...]:
        return tuple(w / self.scale for w in self.shares[stage])

    def _deficits(self, segment: int, position: int, counts: list[int]) -> tuple[int, ...]:
        """Each component's target at `position` minus its count, scaled."""
        since, scale = position - self.starts[segment], self.scale
        shares = self.shares[self.stages[segment]]
        pairs = zip(self._bases[segment], shares, counts, strict=True)
        return tuple([b + w * since - scale * c for b, w, c in pairs])

    def picks(self, position: int, counts: list[int], n: int) -> Picks:
        """The components of positions position .. position+n-1, given each component's count
        of samples before `position`; how many of them each component gives; and the function
        that puts the components' chunks, concatenated, in that order."""
        segment = self.segment_at(position)
        deficits = self._deficits(segment, position, counts)
        last = len(self.starts) - 1
        if segment == last or position + n <= self.starts[segment + 1]:
            block, block_given, _, order = self._block(self.stages[segment], deficits, n)
            return block, block_given, order
        picks: list[int] = []
        given = [0] * len(counts)
        end = position + n
        while position < end:
            segment = self.segment_at(position)
            upto = end if segment == last else min(end, self.starts[segment + 1])
            stage = self.stages[segment]
            block, block_given, deficits, _ = self._block(stage, deficits, upto - position)
            picks += block
            given = [g + b for g, b in zip(given, block_given, strict=True)]
            position = upto
        return tuple(picks), tuple(given), interleaving(tuple(picks), tuple(given))

    def _compute_block(
        self, stage: int, deficits: tuple[int, ...], length: int
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], Callable[[list], list]]:
        shares, scale = self.shares[stage], self.scale
        d = list(deficits)
        every = range(len(d))
        picks = []
        for _ in range(length):
            for c in every:
                d[c] += shares[c]
            best = max(every, key=d.__getitem__)  # the first of equals: the order listed
            d[best] -= scale
            picks.append(best)
        given = tuple(picks.count(c) for c in every)
        return tuple(picks), given, tuple(d), interleaving(tuple(picks), given)


class MixCorpus:
    """Named component corpora and the schedule that mixes them. Each component's encoder puts
    its name before its sample ids (sources/mix.py builds them so).

    `stages` is [(start, weights)], the first from 0, starts increasing. With `by="sample"` a
    start is a position of every stream; with `by="step"` it is a training step, which the server
    cannot know: a stream enters such a stage when its consumer's handshake asks for it
    (`stage`), from the stream's position then on, and its cursor keeps where (`switches`).
    """

    def __init__(
        self,
        components: dict[str, Any],
        stages: list[tuple[int, dict[str, float]]],
        chunking: Chunking,
        by: str = "sample",
    ) -> None:
        self.names = tuple(components)
        self.parts = tuple(components.values())
        self.by = by
        self.starts = tuple(start for start, _ in stages)
        weights = [[w[name] for name in self.names] for _, w in stages]
        by_position = [(start, i) for i, start in enumerate(self.starts)]
        self.schedule = Schedule(weights, by_position if by == "sample" else [(0, 0)])
        self.chunking = chunking
        self.blocking_io = any(part.blocking_io for part in self.parts)
        s = self.schedule
        # A mixture of sample stages keeps the fingerprint it had before step stages existed.
        starts = self.starts if by == "sample" else ("from_step", self.starts)
        self.fingerprint = fingerprint_of(
            "mix",
            [(name, part.fingerprint) for name, part in components.items()],
            starts,
            s.shares,
            s.scale,
        )
        self.stages = [
            {f"from_{by}": start, "weights": dict(zip(self.names, s.weights(i), strict=True))}
            for i, start in enumerate(self.starts)
        ]
        self.description = {
            "source": "mix",
            "components": {
                name: {**part.description, "fingerprint": part.fingerprint}
                for name, part in components.items()
            },
            "stages": self.stages,
        }
        self.served = [0] * len(self.parts)  # samples taken from each component, all streams

    def open_stream(self, spec: ConsumerSpec, **options: Any) -> MixStream:
        return MixStream(self, spec, **options)

    def composition(self, stream: MixStream) -> dict[str, Any]:
        """What `status` reports: the stage and weights of `stream`'s next sample and where that
        stage began in it, every stage, and samples taken from each component by every stream
        since the server started."""
        schedule = stream.schedule
        segment = schedule.segment_at(stream.n)
        weights = schedule.weights_at(stream.n)
        return {
            "stage": schedule.stages[segment],
            "from_sample": schedule.starts[segment],
            "stages": self.stages,
            "components": {
                name: {"weight": weights[c], "samples_served": self.served[c]}
                for c, name in enumerate(self.names)
            },
        }


class MixStream(StreamBase):
    """A consumer's mixture: its own stream of every component, interleaved by the schedule.

    The cursor is the mixture's (`n`, `epoch`) plus every component's cursor (`parts`). `epoch`
    is the largest epoch among the components: with `end.max_epochs: E` the mixture ends when its
    next sample would come from a component about to start epoch E, so no sample repeats more
    than E times. `end.max_samples` counts the mixture's positions. The validation split is every
    component's held-out split, one after the other, in the order the components are listed.

    Stages that start from a training step: `stage` (the handshake's) is the stage of the
    samples the consumer asks for next. A later stage than the cursor's starts at the cursor's
    position; the cursor lists every such switch (`switches`, [[stage, position], ...]), so that
    the stream rebuilt from it has the same schedule (the deficits depend on every earlier
    stage's length). No `stage`: the cursor's, or stage 0.
    """

    def __init__(
        self,
        corpus: MixCorpus,
        spec: ConsumerSpec,
        *,
        epoch: int = 0,
        cursor: Any = None,
        stage: int | None = None,
        max_epochs: int | None = None,
        max_samples: int | None = None,
    ) -> None:
        self._open_end(corpus, spec, max_epochs, max_samples)
        self.blocking_io = corpus.blocking_io
        starts: dict[str, Any] = dict.fromkeys(corpus.names)
        if cursor is not None:
            check_cursor(cursor, corpus.fingerprint, spec, ("epoch", "n"))
            starts = _parts_of(cursor, corpus.names)
        self.parts = [
            self._open_part(c, epoch, starts[name]) for c, name in enumerate(corpus.names)
        ]
        self.n = sum(part.n for part in self.parts)
        if cursor is not None and cursor["n"] != self.n:
            raise CursorError(f"cursor n={cursor['n']} is not the sum of its parts' n ({self.n})")
        self.switches: list[tuple[int, int]] = []
        if stage is not None and corpus.by != "step":
            raise CursorError(NO_STEP_STAGES)
        if stage is not None and stage >= (stages := len(corpus.starts)):
            raise CursorError(f"consumer.stage must be a stage in 0 … {stages - 1}, got {stage}")
        if corpus.by == "step" and spec.split == "train":
            if cursor is not None:
                self.switches = _switches_of(cursor, len(corpus.starts))
            now = self.switches[-1][0] if self.switches else 0
            if stage is not None and stage < now:
                raise CursorError(
                    f"consumer.stage {stage} is before the cursor's stage {now}: stages that "
                    "start from a step only go forward"
                )
            if stage is not None and stage > now:
                self.switches.append((stage, self.n))
        self.schedule = corpus.schedule.switched(self.switches)

    def _open_part(self, c: int, epoch: int, position: Any) -> Stream:
        part = self.corpus.parts[c]
        cursor = None
        if position is not None:  # the component's cursor: the mixture's fields and its position
            if not isinstance(position, dict):
                raise CursorError(f"parts.{self.corpus.names[c]} must be an object")
            s = self.spec
            mine = {"split": s.split, "seed": s.seed, "k": s.index, "K": s.count}
            cursor = {"v": CURSOR_VERSION, "fp": part.fingerprint, **mine, **position}
        try:
            return open_stream(
                part, self.spec, epoch=epoch, cursor=cursor, max_epochs=self.max_epochs
            )
        except CursorError as e:
            raise CursorError(f"parts.{self.corpus.names[c]}: {e}") from None

    @property
    def epoch(self) -> int:  # type: ignore[override]
        return 0 if self.spec.split == "validation" else max(p.epoch for p in self.parts)

    def take(self, n: int) -> list[Chunk]:
        if self.spec.split == "validation":
            out: list[Chunk] = []
            for part in self.parts:  # each split is finite: read them one after the other
                if len(out) == n:
                    break
                out += part.take(n - len(out))
            self.n += len(out)
            return out
        if self.quota is not None:
            n = min(n, self.quota - self.n)
        if n <= 0:
            return []
        parts = self.parts
        picks, wanted, order = self.schedule.picks(self.n, [p.n for p in parts], n)
        before = [p.position() for p in parts] if self.max_epochs is not None else None
        got = [parts[c].take(w) if w else [] for c, w in enumerate(wanted)]
        if before is not None and any(len(g) < w for g, w in zip(got, wanted, strict=True)):
            picks = self._cut_at_end(picks, got, before)
            wanted = tuple(len(g) for g in got)
            order = interleaving(picks, wanted)
        out = order(got[0] + got[1] if len(got) == 2 else list(chain.from_iterable(got)))
        self.n += len(out)
        served = self.corpus.served
        for c, w in enumerate(wanted):
            served[c] += w
        return out

    def _cut_at_end(
        self, picks: tuple[int, ...], got: list[list[Chunk]], before: list[dict]
    ) -> tuple[int, ...]:
        """The picks before the first one whose component has ended; components that read past
        that point are read again from where they were, only as far as they are used."""
        used = [0] * len(got)
        cut = len(picks)
        for i, c in enumerate(picks):
            if used[c] == len(got[c]):
                cut = i
                break
            used[c] += 1
        for c, part in enumerate(self.parts):
            if used[c] < len(got[c]):
                self.parts[c] = part = self._open_part(c, 0, before[c])
                got[c] = part.take(used[c])
        return picks[:cut]

    def cursor(self) -> dict[str, Any]:
        return {
            "v": CURSOR_VERSION,
            "fp": self.corpus.fingerprint,
            "split": self.spec.split,
            "seed": self.spec.seed,
            "k": self.spec.index,
            "K": self.spec.count,
            "epoch": self.epoch,
            "n": self.n,
            "parts": {
                name: part.position()
                for name, part in zip(self.corpus.names, self.parts, strict=True)
            },
            **({"switches": [list(s) for s in self.switches]} if self.corpus.by == "step" else {}),
        }


def interleaving(picks: tuple[int, ...], sizes: tuple[int, ...]) -> Callable[[list], list]:
    """A function that puts the components' chunks, concatenated (`sizes` of each), into the
    order of `picks`, in C (operator.itemgetter)."""
    offsets = [sum(sizes[:c]) for c in range(len(sizes))]
    order = []
    for c in picks:
        order.append(offsets[c])
        offsets[c] += 1
    if len(order) < 2:  # itemgetter of one index returns the item, not a tuple
        return lambda chunks: [chunks[i] for i in order]
    take = itemgetter(*order)
    return lambda chunks: list(take(chunks))


def _parts_of(cursor: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    parts = cursor.get("parts")
    if not isinstance(parts, dict) or sorted(parts) != sorted(names):
        got = sorted(parts) if isinstance(parts, dict) else parts
        raise CursorError(
            f"cursor field 'parts' must hold a cursor for each of {list(names)}, got {got!r:.80}"
        )
    return parts


def _switches_of(cursor: dict[str, Any], stages: int) -> list[tuple[int, int]]:
    """The cursor's switches to stages that start from a step: [[stage, position], ...]."""
    switches = cursor.get("switches")
    pairs = switches if isinstance(switches, list) else [None]
    last_stage, last_position = 0, 0
    for pair in pairs:
        ok = isinstance(pair, list) and len(pair) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        ok = ok and last_stage < pair[0] < stages and last_position <= pair[1] <= cursor["n"]
        if not ok:
            raise CursorError(
                "cursor field 'switches' must be a list of [stage, position], stages increasing "
                f"in 1 … {stages - 1}, positions not decreasing, at most n; got {switches!r:.80}"
            )
        last_stage, last_position = pair
    return [(stage, position) for stage, position in pairs]
