"""Collectives read out of compiled HLO text, with how often each one runs.

Measured (read straight from the text): every all-reduce, all-gather, reduce-scatter, all-to-all
and collective-permute instruction (an async ``-start``/``-done`` pair is one op), its result and
operand shapes and dtypes, its replica groups or source-target pairs, and how many times it runs
per call: the trip counts of its enclosing loops multiplied, summed over call sites. The CPU
readings (``mlsys_jax.analysis.cpu_readings``) are kept apart: ``Collective.as_reduce_scatter``
and ``Collective.in_program_dtypes``.

Device ids in replica groups are SPMD partition ids: for a program jitted over one mesh they are
positions in ``mesh.devices.flat`` (row-major over the mesh axes), whatever the physical ids.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from mlsys_jax.analysis.cpu_readings import program_dtypes_of, sliced_elements
from mlsys_jax.analysis.hlo_module import (
    BITS,
    CallContext,
    Computation,
    HloModule,
    Instruction,
    array_shapes,
    balanced,
    call_contexts,
    ints,
    nbytes,
    parse_module,
    parse_replica_groups,
    users_of,
)

#: Collective kinds, in report order.
KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

# ---- public records -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program and how often it runs per call.

    A tuple-shaped op has several *elements* (one per operand/result pair). ``payload_bytes`` is
    the size of the full (unsharded) side, per device per execution: all-reduce, all-to-all,
    collective-permute: operand bytes (equal to result bytes); all-gather: result bytes (the
    gathered array); reduce-scatter: operand bytes (before the scatter). ``count`` multiplies the
    trip counts of every enclosing ``while`` (an unknown trip count counts as 1 and appears as
    ``None`` in ``trip_counts``).

    Measured: everything but ``sliced`` and ``program_dtypes``, which are inferred from how the
    op's operands are produced and its results used (see ``as_reduce_scatter`` and
    ``in_program_dtypes``).
    """

    name: str
    kind: str
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    operand_bytes: int
    result_bytes: int
    element_bytes: tuple[int, ...]
    group_size: int
    groups: tuple[tuple[int, ...], ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()
    count: int = 1
    trip_counts: tuple[int | None, ...] = ()
    conditional: bool = False
    computation: str = ""
    op_name: str = ""
    #: all-reduce only, per element: its result is used only through a dynamic-slice that keeps
    #: 1/n of it (this device's shard), as a reduce-scatter would leave it.
    sliced: tuple[bool, ...] = ()
    #: per element: the narrower float type the program gave it where the backend widened the
    #: collective (operand converted up from that type, every result converted straight back).
    program_dtypes: tuple[str | None, ...] = ()
    #: empty for an op as compiled; otherwise which reading produced this record.
    inferred: str = ""

    @property
    def dtype(self) -> str:
        """The one dtype of the results, or ``"mixed"`` for a tuple of several."""
        return self.dtypes[0] if len(set(self.dtypes)) == 1 else "mixed"

    @property
    def exact(self) -> bool:
        """Whether ``count`` is exact: every loop's trip count known and no conditional above."""
        return None not in self.trip_counts and not self.conditional

    @property
    def payload_bytes(self) -> int:
        return sum(self.element_bytes)

    @property
    def scatter_bytes(self) -> int:
        """Payload bytes of the elements an ``as_reduce_scatter`` reading turns into a scatter."""
        return sum(b for b, s in zip(self.element_bytes, self.sliced) if s)

    @property
    def traffic_bytes(self) -> float:
        """Bytes each device sends per execution under the ring model (``ring_traffic``)."""
        if self.kind == "collective-permute":
            return float(self.payload_bytes) if any(s != t for s, t in self.pairs) else 0.0
        return ring_traffic(self.kind, self.payload_bytes, self.group_size)

    @property
    def total_payload_bytes(self) -> int:
        return self.count * self.payload_bytes

    @property
    def total_traffic_bytes(self) -> float:
        return self.count * self.traffic_bytes

    def _subset(self, keep: list[int], **changes: Any) -> Collective:
        pick = lambda xs: tuple(xs[i] for i in keep) if xs else ()
        fields = {
            "dtypes": pick(self.dtypes),
            "shapes": pick(self.shapes),
            "element_bytes": pick(self.element_bytes),
            "sliced": pick(self.sliced),
            "program_dtypes": pick(self.program_dtypes),
        }
        fields.update(changes)
        return dataclasses.replace(self, **fields)

    def as_reduce_scatter(self) -> tuple[Collective, ...]:
        """This op read as a GPU/TPU backend would run it: the elements of an all-reduce that
        are only sliced to this device's shard become one reduce-scatter of the same operand
        bytes; the rest stay an all-reduce. Other ops come back unchanged."""
        if self.kind != "all-reduce" or not any(self.sliced):
            return (self,)
        idx = range(len(self.element_bytes))
        scattered = [i for i in idx if self.sliced[i]]
        kept = [i for i in idx if not self.sliced[i]]
        scat_bytes = sum(self.element_bytes[i] for i in scattered)
        n = max(self.group_size, 1)
        out = [
            self._subset(
                scattered,
                kind="reduce-scatter",
                operand_bytes=scat_bytes,
                result_bytes=scat_bytes // n,
                sliced=(),
                inferred=_join(self.inferred, "reduce-scatter"),
            )
        ]
        if kept:
            rest = sum(self.element_bytes[i] for i in kept)
            out.insert(0, self._subset(kept, operand_bytes=rest, result_bytes=rest))
        return tuple(out)

    def in_program_dtypes(self) -> Collective:
        """This op with each widened element counted in the dtype the program gave it (a backend
        with collectives in that dtype, such as GPU or TPU for bf16, sends that many bytes)."""
        if not any(self.program_dtypes):
            return self
        sizes, dtypes = [], []
        for b, d, p in zip(self.element_bytes, self.dtypes, self.program_dtypes):
            sizes.append(b * BITS[p] // BITS[d] if p else b)
            dtypes.append(p or d)
        return dataclasses.replace(
            self,
            element_bytes=tuple(sizes),
            dtypes=tuple(dtypes),
            program_dtypes=(None,) * len(sizes),
            inferred=_join(self.inferred, "program dtype"),
        )


def _join(a: str, b: str) -> str:
    return f"{a}+{b}" if a else b


@dataclasses.dataclass(frozen=True)
class KindSummary:
    """Totals for one collective kind: ops in the text, executions and bytes per call."""

    kind: str
    ops: int
    executions: int
    payload_bytes: int
    traffic_bytes: float


def ring_traffic(kind: str, payload_bytes: float, group_size: int) -> float:
    """Bytes one device sends for one collective under the ring (bandwidth-optimal) model.

    all-reduce 2(n-1)/n S; all-gather (n-1)/n S (S = result); reduce-scatter (n-1)/n S
    (S = operand); all-to-all (n-1)/n S; collective-permute S. A group of one moves nothing.
    """
    n = group_size
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n * payload_bytes
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        return (n - 1) / n * payload_bytes
    if kind == "collective-permute":
        return float(payload_bytes)
    raise ValueError(f"unknown collective kind {kind!r}; kinds are {KINDS}")


def readings(
    collectives: Iterable[Collective], *, as_reduce_scatter: bool = False, program_dtypes: bool = False
) -> list[Collective]:
    """The collectives under the chosen inferred readings (none: the ops as compiled)."""
    items = list(collectives)
    if program_dtypes:
        items = [c.in_program_dtypes() for c in items]
    if as_reduce_scatter:
        items = [r for c in items for r in c.as_reduce_scatter()]
    return items


def summarize(
    collectives: Iterable[Collective], *, as_reduce_scatter: bool = False, program_dtypes: bool = False
) -> dict[str, KindSummary]:
    """Ops, executions, payload and ring traffic per kind (every kind present, zero if unused),
    optionally under the inferred readings of ``readings``."""
    items = readings(collectives, as_reduce_scatter=as_reduce_scatter, program_dtypes=program_dtypes)
    out = {}
    for kind in KINDS:
        mine = [c for c in items if c.kind == kind]
        out[kind] = KindSummary(
            kind=kind,
            ops=len(mine),
            executions=sum(c.count for c in mine),
            payload_bytes=sum(c.total_payload_bytes for c in mine),
            traffic_bytes=sum(c.total_traffic_bytes for c in mine),
        )
    return out


def _kind(opcode: str) -> str | None:
    base = opcode.removesuffix("-start")
    return base if base in KINDS else None


def _collective(
    mod: HloModule,
    comp: Computation,
    ins: Instruction,
    kind: str,
    table: dict[str, Instruction],
    users: dict[str, list[Instruction]],
    ctxs: list[CallContext],
) -> Collective:
    operand_arrays = []
    for op in ins.operands:
        if op in table:
            operand_arrays.extend(array_shapes(table[op].type_text))
    result_type = ins.type_text
    if ins.opcode.endswith("-start"):
        done = [u for u in users.get(ins.name, []) if u.opcode.endswith("-done")]
        if done:
            result_type = done[0].type_text
        elif kind != "all-reduce":
            arrays = array_shapes(ins.type_text)
            result_type = " ".join(f"{d}[{','.join(map(str, s))}]" for d, s in arrays[len(arrays) // 2 :])
    results = array_shapes(result_type)
    if kind == "collective-permute":
        results = results[: max(1, len(operand_arrays))]
    result_sizes = [nbytes(d, s) for d, s in results]
    operand_sizes = [nbytes(d, s) for d, s in operand_arrays]
    groups: tuple[tuple[int, ...], ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()
    if kind == "collective-permute":
        text = ins.attr("source_target_pairs") or "{}"
        body = balanced(text, "{", "}")
        pairs = tuple((s, t) for s, t in (ints(p) for p in re.findall(r"\{([^{}]*)\}", body[1:-1])))
        size = _largest_component(pairs)
    else:
        text = ins.attr("replica_groups")
        groups = parse_replica_groups(text, mod.num_devices) if text else (tuple(range(mod.num_devices)),)
        size = max(len(g) for g in groups)
    if len(operand_sizes) != len(result_sizes):  # operands not found: infer from the results
        factor = {"reduce-scatter": size, "all-gather": 1 / size}.get(kind, 1)
        operand_sizes = [int(b * factor) for b in result_sizes]
    element_bytes = operand_sizes if kind == "reduce-scatter" else result_sizes
    meta = re.search(r'op_name="([^"]*)"', ins.attrs)
    first = ctxs[0] if ctxs else CallContext(1, (), False)
    return Collective(
        name=ins.name,
        kind=kind,
        dtypes=tuple(d for d, _ in results),
        shapes=tuple(s for _, s in results),
        operand_bytes=sum(operand_sizes),
        result_bytes=sum(result_sizes),
        element_bytes=tuple(element_bytes),
        group_size=size,
        groups=groups,
        pairs=pairs,
        count=sum(c.count for c in ctxs) if ctxs else 1,
        trip_counts=first.trips,
        conditional=any(c.conditional for c in ctxs),
        computation=comp.name,
        op_name=meta.group(1) if meta else "",
        sliced=sliced_elements(mod, comp, ins, size, users) if kind == "all-reduce" else (),
        program_dtypes=program_dtypes_of(mod, comp, ins, kind, table, users),
    )


def _largest_component(pairs: tuple[tuple[int, int], ...]) -> int:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s, t in pairs:
        parent[find(s)] = find(t)
    sizes: dict[int, int] = {}
    for x in list(parent):
        r = find(x)
        sizes[r] = sizes.get(r, 0) + 1
    return max(sizes.values(), default=1)


def collectives(hlo: Any) -> tuple[Collective, ...]:
    """Every collective in a compiled program, in text order: pass ``compiled.as_text()`` or
    the compiled object itself. Ops in computations never reached from ENTRY are left out."""
    text = hlo if isinstance(hlo, str) else hlo.as_text()
    mod = parse_module(text)
    ctxs = call_contexts(mod)
    out = []
    for comp in mod.computations.values():
        if comp.name not in ctxs:
            continue
        table, users = comp.by_name(), None
        for ins in comp.instructions:
            kind = _kind(ins.opcode)
            if kind is None:
                continue
            users = users or users_of(comp)
            out.append(_collective(mod, comp, ins, kind, table, users, ctxs[comp.name]))
    return tuple(out)
