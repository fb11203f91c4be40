"""Pipeline schedules as data: for every (tick, stage), the piece of work that stage does.

A pipeline of ``p`` stages splits a batch into ``m`` microbatches. With ``v`` virtual stages per
device (interleaving) the model is cut into ``v * p`` chunks; chunk ``g`` lives on device
``g % p`` as its local chunk ``g // p``. Work comes in three kinds:

- ``F``: the forward pass of one microbatch through one chunk;
- ``B``: its backward pass (for the zero-bubble schedule only the input-gradient half);
- ``W``: the weight-gradient half of a backward (zero-bubble only).

Time runs in ticks. In one tick every stage does at most one piece of work, and what a stage
sends (activations forward, their gradients back) arrives for the next tick: this is how one SPMD
program executes the table, a ``ppermute`` between ticks. A ``Schedule`` is that table, built by
running each stage's work list as soon as its inputs have arrived; it knows its bubble (the idle
share of all stage-ticks) and its peak stash (the most microbatch inputs a stage holds for a
backward still to come), and ``check`` proves any table valid: every piece of work exactly once,
on the device that holds its chunk, after the work it needs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from mlsys_jax.parallel.errors import PlanError

KINDS = ("F", "B", "W")


@dataclasses.dataclass(frozen=True, order=True)
class Work:
    """One piece of work: ``kind`` of microbatch ``microbatch`` through model chunk ``chunk``
    (0 .. v*p-1, in model order)."""

    kind: str
    microbatch: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: ``grid[tick][stage]`` is the ``Work`` that stage does then, or None."""

    name: str
    stages: int
    microbatches: int
    virtual: int
    split_backward: bool
    grid: tuple[tuple[Work | None, ...], ...]

    @property
    def ticks(self) -> int:
        return len(self.grid)

    @property
    def chunks(self) -> int:
        return self.virtual * self.stages

    def device_of(self, chunk: int) -> int:
        return chunk % self.stages

    def local_chunk(self, chunk: int) -> int:
        """Which of its ``v`` chunks ``chunk`` is on its device."""
        return chunk // self.stages

    @property
    def bubble(self) -> float:
        """The idle share of all stage-ticks."""
        busy = sum(w is not None for row in self.grid for w in row)
        return 1.0 - busy / (self.ticks * self.stages)

    def stash(self) -> list[list[int]]:
        """``stash()[tick][stage]``: microbatch inputs held after that tick for a backward still
        to come (from a chunk's F until its B, or until its W when the backward is split)."""
        last = "W" if self.split_backward else "B"
        held = [0] * self.stages
        out = []
        for row in self.grid:
            for stage, work in enumerate(row):
                if work is None:
                    continue
                if work.kind == "F":
                    held[stage] += 1
                elif work.kind == last:
                    held[stage] -= 1
            out.append(list(held))
        return out

    def slots(self) -> list[list[int]]:
        """``slots()[tick][stage]``: the stash slot (0 .. peak_stash-1) the work at that cell
        writes (F) or reads (B, W); -1 for an idle cell. A slot is taken by a chunk's forward and
        freed by its last backward piece, lowest free slot first."""
        last = "W" if self.split_backward else "B"
        free: list[list[int]] = [list(range(self.peak_stash)) for _ in range(self.stages)]
        held: list[dict[tuple[int, int], int]] = [{} for _ in range(self.stages)]
        out = []
        for row in self.grid:
            cells = []
            for stage, work in enumerate(row):
                if work is None:
                    cells.append(-1)
                    continue
                key = (work.microbatch, work.chunk)
                if work.kind == "F":
                    slot = min(free[stage])
                    free[stage].remove(slot)
                    held[stage][key] = slot
                else:
                    slot = held[stage][key]
                    if work.kind == last:
                        free[stage].append(held[stage].pop(key))
                cells.append(slot)
            out.append(cells)
        return out

    @property
    def peak_stash(self) -> int:
        """The most microbatch inputs any stage holds at once."""
        return max((max(row) for row in self.stash()), default=0)

    def work(self) -> list[Work]:
        """Every piece of work the schedule must contain, once each."""
        kinds = KINDS if self.split_backward else KINDS[:2]
        return [Work(k, i, c) for k in kinds for i in range(self.microbatches) for c in range(self.chunks)]

    def check(self) -> None:
        """Raise ``ScheduleError`` unless every piece of work appears exactly once, on the device
        holding its chunk, after (in an earlier tick than) everything it needs."""
        done: dict[Work, int] = {}
        for tick, row in enumerate(self.grid):
            if len(row) != self.stages:
                raise ScheduleError(f"{self.name}: tick {tick} has {len(row)} stages, not {self.stages}")
            for stage, work in enumerate(row):
                if work is None:
                    continue
                if work in done:
                    raise ScheduleError(
                        f"{self.name}: {work} of chunk {work.chunk} runs twice (ticks {done[work]} and {tick})"
                    )
                if self.device_of(work.chunk) != stage:
                    raise ScheduleError(
                        f"{self.name}: {work} of chunk {work.chunk} runs on stage {stage}, but "
                        f"that chunk lives on stage {self.device_of(work.chunk)}"
                    )
                for need in needs(work, self.chunks, self.split_backward):
                    if done.get(need, tick) >= tick:
                        raise ScheduleError(
                            f"{self.name}: {work} of chunk {work.chunk} at tick {tick} needs "
                            f"{need} of chunk {need.chunk} from an earlier tick"
                        )
                done[work] = tick
        missing = [w for w in self.work() if w not in done]
        extra = [w for w in done if w not in set(self.work())]
        if missing or extra:
            raise ScheduleError(f"{self.name}: missing {missing[:4]}, unexpected {extra[:4]}")

    def __str__(self) -> str:
        from mlsys_jax.parallel.pipeline.render import text

        return text(self)

    def render(self, path: str) -> None:
        """Draw the schedule as a Gantt chart (stages x ticks) into an image file."""
        from mlsys_jax.parallel.pipeline.render import draw

        draw(self, path)


class ScheduleError(PlanError):
    """A schedule that cannot run: impossible settings, or a table that breaks a dependency."""


def needs(work: Work, chunks: int, split_backward: bool) -> list[Work]:
    """The work that must be done before ``work``: the same microbatch's forward through the chunk
    before; its backward through the chunk after (or its own forward, on the last chunk) and its
    own forward; a weight gradient needs its input-gradient half."""
    i, c = work.microbatch, work.chunk
    if work.kind == "F":
        return [Work("F", i, c - 1)] if c > 0 else []
    if work.kind == "B":
        later = Work("B", i, c + 1) if c + 1 < chunks else None
        return [Work("F", i, c)] + ([later] if later else [])
    return [Work("B", i, c)]


def lockstep(
    name: str, stages: int, total: int, pick: Callable[[int, set[Work]], Work | None]
) -> tuple[tuple[Work | None, ...], ...]:
    """Tick after tick, ask each stage what it does given the work done in earlier ticks
    (``pick`` commits its choice), until ``total`` pieces are done; the table."""
    done: set[Work] = set()
    grid: list[tuple[Work | None, ...]] = []
    while len(done) < total:
        row = tuple(pick(stage, done) for stage in range(stages))
        if all(w is None for w in row):
            raise ScheduleError(f"{name}: no stage can proceed at tick {len(grid)}")
        done.update(w for w in row if w is not None)
        grid.append(row)
    return tuple(grid)


def simulate(
    name: str, stages: int, microbatches: int, virtual: int, split_backward: bool, orders: Sequence[Sequence[Work]]
) -> Schedule:
    """Run each stage's work list in order, each piece as soon as what it needs was done in an
    earlier tick; the resulting table."""
    chunks = virtual * stages
    position = [0] * stages

    def pick(stage: int, done: set[Work]) -> Work | None:
        order = orders[stage]
        work = order[position[stage]] if position[stage] < len(order) else None
        if work is None or not all(n in done for n in needs(work, chunks, split_backward)):
            return None
        position[stage] += 1
        return work

    grid = lockstep(name, stages, sum(len(o) for o in orders), pick)
    return Schedule(name, stages, microbatches, virtual, split_backward, grid)


def forward_only(schedule: Schedule) -> Schedule:
    """The forwards of ``schedule`` alone, each stage keeping its own order: a pipelined
    evaluation (its table has no backward, so ``check`` does not apply)."""
    orders: list[list[Work]] = [[] for _ in range(schedule.stages)]
    for row in schedule.grid:
        for s, work in enumerate(row):
            if work is not None and work.kind == "F":
                orders[s].append(work)
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual
    return simulate(f"{schedule.name} forwards", p, m, v, False, orders)


# ---- the schedules ----------------------------------------------------------------------------
def _check_counts(name: str, stages: int, microbatches: int, virtual: int = 1) -> None:
    if stages < 1 or microbatches < 1 or virtual < 1:
        raise ScheduleError(
            f"{name}: stages, microbatches and virtual stages must be at least 1, got "
            f"{stages}, {microbatches} and {virtual}"
        )


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: every microbatch forward, then every backward; stashes all ``m`` microbatches."""
    _check_counts("gpipe", stages, microbatches)
    orders = [
        [Work("F", i, s) for i in range(microbatches)] + [Work("B", i, s) for i in range(microbatches)]
        for s in range(stages)
    ]
    return simulate("gpipe", stages, microbatches, 1, False, orders)


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): ``p - 1 - s`` warm-up forwards on stage ``s``, then one forward
    and one backward in turn, then the remaining backwards; stashes at most ``p`` microbatches."""
    _check_counts("1f1b", stages, microbatches)
    if microbatches < stages:
        raise ScheduleError(
            f"1f1b needs at least as many microbatches as stages: {microbatches} microbatches "
            f"for {stages} stages. Fix: --microbatches {stages} or more (or --schedule gpipe)."
        )
    orders = []
    for s in range(stages):
        warm = min(stages - 1 - s, microbatches)
        order = [Work("F", i, s) for i in range(warm)]
        for i in range(microbatches - warm):
            order += [Work("F", warm + i, s), Work("B", i, s)]
        order += [Work("B", i, s) for i in range(microbatches - warm, microbatches)]
        orders.append(order)
    return simulate("1f1b", stages, microbatches, 1, False, orders)


def interleaved(stages: int, microbatches: int, virtual: int) -> Schedule:
    """Interleaved 1F1B: each device holds ``v`` chunks (chunk ``c * p + s`` on device ``s``);
    microbatches go through in groups of ``p``, every chunk of a device in turn, which shrinks the
    bubble ``v``-fold."""
    _check_counts("interleaved", stages, microbatches, virtual)
    if microbatches % stages:
        raise ScheduleError(
            f"interleaved needs microbatches in whole groups of the {stages} stages: "
            f"{microbatches} is not a multiple of {stages}. Fix: --microbatches "
            f"{max(stages, microbatches // stages * stages)} or "
            f"{(microbatches // stages + 1) * stages}."
        )
    total = virtual * microbatches

    def kth(k: int, kind: str, s: int) -> Work:
        group, rest = divmod(k, stages * virtual)
        local, offset = divmod(rest, stages)
        if kind == "B":
            local = virtual - 1 - local
        return Work(kind, group * stages + offset, local * stages + s)

    orders = []
    for s in range(stages):
        warm = min((stages - 1 - s) * 2 + (virtual - 1) * stages, total)
        order = [kth(k, "F", s) for k in range(warm)]
        for k in range(total - warm):
            order += [kth(warm + k, "F", s), kth(k, "B", s)]
        order += [kth(k, "B", s) for k in range(total - warm, total)]
        orders.append(order)
    return simulate("interleaved", stages, microbatches, virtual, False, orders)


def zero_bubble(stages: int, microbatches: int) -> Schedule:
    """ZB-H1: the backward split into its input-gradient half ``B`` (on the critical path) and
    its weight-gradient half ``W`` (free to wait); each stage runs a ready ``B`` first, else a
    forward while it holds fewer than 1F1B's ``p - s`` microbatches, else a ``W`` to fill what
    would have been bubble. The same peak stash as 1F1B; with F, B and W one tick each, a bubble
    of ``2(p-1) / (3m + 2(p-1))``, two thirds of 1F1B's idle time at the same work."""
    _check_counts("zb", stages, microbatches)
    if microbatches < stages:
        raise ScheduleError(
            f"zb needs at least as many microbatches as stages: {microbatches} microbatches "
            f"for {stages} stages. Fix: --microbatches {stages} or more."
        )
    next_f, next_b, next_w = [0] * stages, [0] * stages, [0] * stages

    def pick(s: int, done: set[Work]) -> Work | None:
        def ready(work: Work) -> bool:
            return all(n in done for n in needs(work, stages, True))

        b = Work("B", next_b[s], s) if next_b[s] < microbatches else None
        f = Work("F", next_f[s], s) if next_f[s] < microbatches else None
        w = Work("W", next_w[s], s) if next_w[s] < next_b[s] else None
        if b is not None and ready(b):
            next_b[s] += 1
            return b
        if f is not None and ready(f) and next_f[s] - next_w[s] < stages - s:
            next_f[s] += 1
            return f
        if w is not None:
            next_w[s] += 1
            return w
        return None

    return Schedule("zb", stages, microbatches, 1, True, lockstep("zb", stages, 3 * stages * microbatches, pick))


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")


@functools.lru_cache(maxsize=1024)
def make_schedule(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The named schedule (``gpipe``, ``1f1b``, ``interleaved``, ``zb``) for these counts (built
    once per counts: a schedule is immutable, and a planner asks for the same ones often)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; the schedules are {list(SCHEDULES)}")
    if virtual != 1 and name != "interleaved":
        raise ScheduleError(
            f"--virtual-stages {virtual} applies to the interleaved schedule only, not {name!r}. "
            "Fix: --schedule interleaved, or drop --virtual-stages."
        )
    if name == "gpipe":
        return gpipe(stages, microbatches)
    if name == "1f1b":
        return one_f_one_b(stages, microbatches)
    if name == "interleaved":
        return interleaved(stages, microbatches, virtual)
    return zero_bubble(stages, microbatches)


def check_layers(layers: int, stages: int, virtual: int = 1) -> None:
    """Refuse a layer count the pipeline cannot cut into equal chunks, listing the counts that work."""
    if stages > layers:
        raise ScheduleError(
            f"a pipeline of {stages} stages needs at least {stages} layers; the model has "
            f"{layers}. Fix: a pipeline axis of at most {layers}."
        )
    chunks = stages * virtual
    if layers % chunks:
        what = f"{stages} stages x {virtual} virtual stages" if virtual > 1 else f"{stages} stages"
        fixes = []
        stage_counts = [p for p in range(1, layers + 1) if layers % (p * virtual) == 0]
        if stage_counts:
            per = f" with {virtual} virtual stages" if virtual > 1 else ""
            fixes.append(f"a pipeline axis of {stage_counts}{per}")
        if virtual > 1 and layers % stages == 0:
            fixes.append(
                f"--virtual-stages from {[v for v in range(1, layers // stages + 1) if layers % (stages * v) == 0]}"
            )
        fixes.append(f"a layer count that is a multiple of {chunks}")
        raise ScheduleError(
            f"{layers} layers do not split into {what} ({chunks} equal chunks). Fix: " + ", or ".join(fixes) + "."
        )
