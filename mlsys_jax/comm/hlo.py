"""Collectives read out of compiled (optimized) HLO text, with how often each one runs.

*Measured* (read straight from the text): every all-reduce, all-gather, reduce-scatter,
all-to-all and collective-permute instruction (an async ``-start``/``-done`` pair is one op),
its result and operand shapes and dtypes, its replica groups or source-target pairs, and the
``known_trip_count`` XLA records on each enclosing ``while``. Executions per call multiply the
enclosing loops' trip counts (summed over call sites).

*Inferred* (from how operands are produced and results used), each kept apart from the raw op:

* a trip count XLA did not record, from the loop's condition (``i < N``, constant start/step);
* ``as_reduce_scatter``: an all-reduce whose results are only used through a dynamic-slice that
  keeps 1/n of them. XLA:CPU leaves this pattern (even for a plain ``psum`` then slice of
  ``axis_index``) where GPU and TPU backends emit a reduce-scatter;
* ``in_program_dtypes``: XLA:CPU has no bf16 collectives and widens them to f32 (converting the
  operand up and, for reductions, the result back down, or naming the widened reduction
  ``*_promoted``); this reading counts such an element in the narrow dtype the program gave it,
  as a backend with bf16 collectives would send it.

Device ids in replica groups are SPMD partition ids: for a program jitted over one mesh they are
positions in ``mesh.devices.flat`` (row-major over the mesh axes), whatever the physical ids.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: Collective kinds, in report order.
KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)

_BITS = {
    "pred": 8,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "f16": 16,
    "bf16": 16,
    "s32": 32,
    "u32": 32,
    "f32": 32,
    "s64": 64,
    "u64": 64,
    "f64": 64,
    "c64": 64,
    "c128": 128,
    "token": 0,
}

_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_NAME = re.compile(r"%([\w.\-]+)")


class HloParseError(ValueError):
    """HLO text this module cannot read (it names the instruction and what was expected)."""


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
            sizes.append(b * _BITS[p] // _BITS[d] if p else b)
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


# ---- shapes and replica groups ------------------------------------------------------------


def array_shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in an HLO type (``f32[8,16]{1,0}`` or a tuple of them) as (dtype, dims)."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype not in _BITS:
            continue
        shape = tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append((dtype, shape))
    return out


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of one array (sub-byte types rounded up)."""
    return (math.prod(shape) * _BITS[dtype] + 7) // 8


def _iota(dims: list[int], perm: list[int] | None) -> list[int]:
    """XLA's iota tile assignment: iota(prod(dims)) reshaped to dims, transposed by perm, flat."""
    total = math.prod(dims)
    if perm is None:
        return list(range(total))
    strides = [math.prod(dims[i + 1 :]) for i in range(len(dims))]
    out_dims = [dims[p] for p in perm]
    out = []
    for flat in range(total):
        idx, rem = [], flat
        for d in reversed(out_dims):
            idx.append(rem % d)
            rem //= d
        idx.reverse()
        out.append(sum(idx[k] * strides[perm[k]] for k in range(len(perm))))
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _parse_iota(text: str) -> tuple[list[int], list[int], str]:
    """``[4,2]<=[2,4]T(1,0)`` (or ``[2,2,2]T(0,2,1)``, reshape dims left out) -> (shape,
    device list, rest of text)."""
    m = re.match(r"\[([\d,]*)\](?:<=\[([\d,]*)\])?(?:T\(([\d,]*)\))?", text)
    if not m:
        raise HloParseError(f"cannot read iota device list {text[:60]!r}")
    shape = _ints(m.group(1))
    dims = _ints(m.group(2)) if m.group(2) is not None else shape
    perm = _ints(m.group(3)) if m.group(3) is not None else None
    return shape, _iota(dims, perm), text[m.end() :]


def _balanced(text: str, open_ch: str, close_ch: str) -> str:
    """The prefix of ``text`` (which starts with ``open_ch``) up to its matching close."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return text[: i + 1]
    raise HloParseError(f"unbalanced {open_ch}{close_ch} in {text[:80]!r}")


def _mesh_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """Shardy-style groups: ``mesh['a'=4,'b'=2][, device_ids=(...)] {'a'}``.

    The devices are ``device_ids`` (iota form or a list; default iota) laid out over the named
    axes; a group holds the devices that differ only along the braced axes. A sub-axis
    ``'a':(p)s`` is the size-``s`` factor of ``a`` below the major factor ``p``.
    """
    m = re.match(r"mesh\[([^\]]*)\]", text)
    if not m:
        raise HloParseError(f"cannot read mesh replica groups {text[:80]!r}")
    axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))]
    rest = text[m.end() :].lstrip(", ")
    devices = list(range(math.prod(s for _, s in axes)))
    if rest.startswith("device_ids="):
        body = _balanced(rest[len("device_ids=") :], "(", ")")
        inner = body[1:-1].strip()
        devices = _parse_iota(inner)[1] if inner.startswith("[") else _ints(inner)
        rest = rest[len("device_ids=") + len(body) :].lstrip(", ")
    chosen = re.match(r"\{([^}]*)\}", rest.strip())
    if not chosen:
        raise HloParseError(f"mesh replica groups without a braced axis list: {text[:80]!r}")
    # Split each axis into factors (major first) so every chosen sub-axis is a whole dim.
    dims: list[tuple[str, int, int]] = []  # (axis, pre-size, size)
    wanted: list[tuple[str, int, int]] = []
    for item in re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", chosen.group(1)):
        name, pre, size = item
        total = dict(axes)[name]
        wanted.append((name, int(pre) if pre else 1, int(size) if size else total))
    for name, size in axes:
        cuts = sorted({(p, s) for n, p, s in wanted if n == name and (p, s) != (1, size)})
        pos = 1
        for pre, sub in cuts:
            if pre > pos:
                dims.append((name, pos, pre // pos))
            dims.append((name, pre, sub))
            pos = pre * sub
        if pos < size or not cuts:
            dims.append((name, pos, size // pos))
    shape = [s for _, _, s in dims]
    group_dims = [dims.index(w) for w in wanted]
    others = [i for i in range(len(dims)) if i not in group_dims]
    return _regroup(devices, shape, others, group_dims)


def _regroup(devices: list[int], shape: list[int], outer: list[int], inner: list[int]) -> tuple[tuple[int, ...], ...]:
    """Groups of ``devices`` (laid out row-major over ``shape``) along the ``inner`` dims."""
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]

    def coords(dim_list: list[int]) -> list[int]:
        offs = [0]
        for d in dim_list:
            offs = [o + k * strides[d] for o in offs for k in range(shape[d])]
        return offs

    return tuple(tuple(devices[o + i] for i in coords(inner)) for o in coords(outer))


def parse_replica_groups(text: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """Replica groups from the text after ``replica_groups=``: explicit ``{{0,1},{2,3}}``, iota
    ``[4,2]<=[8]`` / ``[2,4]<=[4,2]T(1,0)``, or Shardy's ``mesh[...] {...}``. ``{}`` means one
    group of all ``num_devices``."""
    text = text.strip()
    if text.startswith("{"):
        body = _balanced(text, "{", "}")[1:-1].strip()
        if not body:
            return (tuple(range(num_devices)),)
        return tuple(tuple(_ints(g)) for g in re.findall(r"\{([^{}]*)\}", body))
    if text.startswith("["):
        shape, devices, _ = _parse_iota(text)
        if len(shape) != 2:
            raise HloParseError(f"iota replica groups need a 2-d shape, got {text[:60]!r}")
        return tuple(tuple(devices[g * shape[1] : (g + 1) * shape[1]]) for g in range(shape[0]))
    if text.startswith("mesh"):
        return _mesh_groups(text)
    raise HloParseError(f"cannot read replica groups {text[:80]!r}")


# ---- parsing the module -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = type opcode(operands), attrs``."""

    name: str
    type_text: str
    opcode: str
    operand_text: str
    attrs: str
    root: bool = False

    @property
    def operands(self) -> list[str]:
        return _NAME.findall(self.operand_text)

    def attr(self, key: str) -> str | None:
        """The raw text after ``key=`` (to the end of the attrs), or None."""
        m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", self.attrs)
        return self.attrs[m.end() :] if m else None

    def callee(self, key: str) -> str | None:
        text = self.attr(key)
        m = re.match(r"%?([\w.\-]+)", text) if text else None
        return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class Computation:
    """A named list of instructions (the ENTRY, a loop body, a fused computation, ...)."""

    name: str
    instructions: tuple[Instruction, ...]
    entry: bool = False

    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction:
        for i in self.instructions:
            if i.root:
                return i
        return self.instructions[-1]


@dataclasses.dataclass(frozen=True)
class HloModule:
    """Computations by name, the ENTRY's name and the number of partitions (devices)."""

    name: str
    computations: Mapping[str, Computation]
    entry: str
    num_devices: int


def _split_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
    if rest.startswith("("):
        type_text = _balanced(rest, "(", ")")
    else:
        type_text = rest.split(" ", 1)[0]
    rest = rest[len(type_text) :]
    om = _OPCODE.match(rest)
    if not om:
        return None
    opcode = om.group(1)
    ops = _balanced(rest[om.end() - 1 :], "(", ")")
    attrs = rest[om.end() - 1 + len(ops) :].lstrip(", ")
    return Instruction(name, type_text, opcode, ops[1:-1], attrs, root)


def parse_module(text: str) -> HloModule:
    """Split HLO text into computations of instructions (enough structure for this module)."""
    header = re.search(r"^HloModule\s+([\w.\-]+)(.*)$", text, re.MULTILINE)
    name = header.group(1) if header else "module"
    parts = re.search(r"num_partitions=(\d+)", header.group(2)) if header else None
    reps = re.search(r"replica_count=(\d+)", header.group(2)) if header else None
    num = int(parts.group(1)) if parts else 1
    if num == 1 and reps:
        num = int(reps.group(1))
    comps: dict[str, Computation] = {}
    entry = ""
    current: tuple[str, bool] | None = None
    body: list[Instruction] = []
    for line in text.splitlines():
        if current is None:
            hm = _HEADER.match(line)
            if hm:
                current, body = (hm.group(2), bool(hm.group(1))), []
            continue
        if line.strip() == "}":
            comps[current[0]] = Computation(current[0], tuple(body), current[1])
            if current[1]:
                entry = current[0]
            current = None
            continue
        instr = _split_instruction(line)
        if instr is not None:
            body.append(instr)
    if not entry:
        raise HloParseError("no ENTRY computation found; pass the text of compiled.as_text()")
    return HloModule(name, comps, entry, num)


# ---- loops and call counts ----------------------------------------------------------------


def _constant(comp: Computation, name: str, table: dict[str, Instruction]) -> int | None:
    """The integer value of ``name`` if it is a scalar constant (through copies/converts)."""
    seen = 0
    while name in table and seen < 16:
        ins = table[name]
        if ins.opcode == "constant":
            vals = _ints(ins.operand_text)
            return vals[0] if len(vals) == 1 else None
        if ins.opcode in ("copy", "convert", "bitcast", "reshape") and ins.operands:
            name, seen = ins.operands[0], seen + 1
            continue
        return None
    return None


def _tuple_index(ins: Instruction) -> int | None:
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m.group(1)) if m else None


def _through_fusion(mod: HloModule, comp: Computation, ins: Instruction) -> tuple[Instruction, list[str | None]]:
    """For a fusion, the called root and, per root operand, the caller's operand name; other
    instructions map to themselves."""
    if ins.opcode != "fusion":
        return ins, list(ins.operands)
    called = mod.computations.get(ins.callee("calls") or "")
    if called is None:
        return ins, list(ins.operands)
    inner = called.by_name()
    root = called.root
    mapped: list[str | None] = []
    for op in root.operands:
        p = inner.get(op)
        if p is not None and p.opcode == "parameter":
            k = _ints(p.operand_text)[0]
            mapped.append(ins.operands[k] if k < len(ins.operands) else None)
        elif p is not None and p.opcode == "constant":
            mapped.append(f"__const__{_ints(p.operand_text)[0]}" if _ints(p.operand_text) else None)
        else:
            mapped.append(None)
    return root, mapped


def _value(
    mod: HloModule, comp: Computation, table: dict[str, Instruction], name: str | None
) -> tuple[str, int] | None:
    """A scalar as ('const', v) or ('iv', tuple index of the loop parameter), else None."""
    if name is None:
        return None
    if name.startswith("__const__"):
        return ("const", int(name[len("__const__") :]))
    v = _constant(comp, name, table)
    if v is not None:
        return ("const", v)
    ins = table.get(name)
    while ins is not None and ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
        ins = table.get(ins.operands[0])
    if ins is not None and ins.opcode == "get-tuple-element":
        src = table.get(ins.operands[0]) if ins.operands else None
        if src is not None and src.opcode == "parameter":
            idx = _tuple_index(ins)
            return ("iv", idx) if idx is not None else None
    return None


def derive_trip_count(mod: HloModule, comp: Computation, loop: Instruction) -> int | None:
    """Trip count of a ``while`` from its condition ``i < N`` (or ``<=``), a constant start in
    the init tuple and a constant step ``i + k`` in the body; None if the loop is not of that form."""
    cond = mod.computations.get(loop.callee("condition") or "")
    body = mod.computations.get(loop.callee("body") or "")
    if cond is None or body is None:
        return None
    ctab = cond.by_name()
    root, ops = _through_fusion(mod, cond, cond.root)
    if root.opcode != "compare" or len(ops) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root.attrs)
    lhs, rhs = _value(mod, cond, ctab, ops[0]), _value(mod, cond, ctab, ops[1])
    if direction is None or lhs is None or rhs is None:
        return None
    d = direction.group(1)
    if lhs[0] == "const" and rhs[0] == "iv":
        lhs, rhs, d = rhs, lhs, {"GT": "LT", "GE": "LE"}.get(d, "")
    if lhs[0] != "iv" or rhs[0] != "const" or d not in ("LT", "LE"):
        return None
    index, bound = lhs[1], rhs[1] + (1 if d == "LE" else 0)
    # Start: the while's operand, a tuple whose element `index` is a constant.
    table = comp.by_name()
    init = table.get(loop.operands[0]) if loop.operands else None
    if init is None or init.opcode != "tuple" or index >= len(init.operands):
        return None
    start = _constant(comp, init.operands[index], table)
    # Step: the body's root tuple element `index` is iv + constant.
    btab = body.by_name()
    broot = body.root
    if broot.opcode != "tuple" or index >= len(broot.operands):
        return None
    upd = btab.get(broot.operands[index])
    if upd is None:
        return None
    add, add_ops = _through_fusion(mod, body, upd)
    if add.opcode != "add" or len(add_ops) != 2:
        return None
    a, b = _value(mod, body, btab, add_ops[0]), _value(mod, body, btab, add_ops[1])
    if a is not None and a[0] == "const":
        a, b = b, a
    if start is None or a != ("iv", index) or b is None or b[0] != "const" or b[1] <= 0:
        return None
    return max(0, -(-(bound - start) // b[1]))


@dataclasses.dataclass(frozen=True)
class _Context:
    count: int
    trips: tuple[int | None, ...]
    conditional: bool


def _contexts(mod: HloModule) -> dict[str, list[_Context]]:
    """Every way each computation is reached from ENTRY, with the loop trip counts on the way."""
    out: dict[str, list[_Context]] = {mod.entry: [_Context(1, (), False)]}
    order: list[str] = []
    state: dict[str, int] = {}

    def callees(comp: Computation) -> list[tuple[str, Instruction, str]]:
        found = []
        for ins in comp.instructions:
            if ins.opcode.endswith("-done") or ins.opcode.endswith("-update"):
                continue
            for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation"):
                c = ins.callee(key)
                if c:
                    found.append((c, ins, key))
            branches = ins.attr("branch_computations")
            if branches:
                for c in _NAME.findall(_balanced(branches, "{", "}")):
                    found.append((c, ins, "branch"))
        return [f for f in found if f[0] in mod.computations]

    def visit(name: str) -> None:  # post-order DFS, iterative to survive deep graphs
        stack = [(name, False)]
        while stack:
            n, done = stack.pop()
            if done:
                state[n] = 2
                order.append(n)
                continue
            if state.get(n):
                continue
            state[n] = 1
            stack.append((n, True))
            for c, _, _ in callees(mod.computations[n]):
                if not state.get(c):
                    stack.append((c, False))

    visit(mod.entry)
    for name in reversed(order):  # callers before callees
        comp = mod.computations[name]
        for ctx in out.get(name, []):
            for callee, ins, key in callees(comp):
                trips, count, cond = ctx.trips, ctx.count, ctx.conditional
                if ins.opcode == "while" and key in ("body", "condition"):
                    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
                    n = int(m.group(1)) if m else derive_trip_count(mod, comp, ins)
                    trips = trips + (n,)
                    count = count * (n if n is not None else 1)
                    if key == "condition" and n is not None:
                        count = ctx.count * (n + 1)
                elif key in ("true_computation", "false_computation", "branch"):
                    cond = True
                out.setdefault(callee, []).append(_Context(count, trips, cond))
    return out


# ---- collectives --------------------------------------------------------------------------

_PASS_THROUGH = {
    "bitcast",
    "convert",
    "copy",
    "reshape",
    "transpose",
    "negate",
    "abs",
    "add",
    "subtract",
    "multiply",
    "divide",
    "maximum",
    "minimum",
    "select",
    "clamp",
    "sqrt",
    "rsqrt",
    "exp",
    "log",
    "tanh",
    "power",
    "bitcast-convert",
    "compare",
    "and",
    "or",
    "not",
}


def _elements(type_text: str) -> int:
    return sum(math.prod(s) for _, s in array_shapes(type_text))


def _users(comp: Computation) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for ins in comp.instructions:
        for op in set(ins.operands):
            users.setdefault(op, []).append(ins)
    return users


def _only_sharded(
    mod: HloModule,
    comp: Computation,
    name: str,
    elements: int,
    n: int,
    users: dict[str, list[Instruction]],
    depth: int = 0,
) -> bool:
    """Whether every use of value ``name`` (``elements`` elements) ends in a dynamic-slice that
    keeps ``elements / n`` of them, passing only through elementwise and layout ops (also
    inside fusions)."""
    uses = users.get(name, [])
    if not uses or depth > 32:
        return False
    for use in uses:
        if use.opcode == "dynamic-slice":
            if use.operands[0] != name or _elements(use.type_text) * n != elements:
                return False
        elif use.opcode in _PASS_THROUGH:
            if _elements(use.type_text) != elements:
                return False
            if not _only_sharded(mod, comp, use.name, elements, n, users, depth + 1):
                return False
        elif use.opcode == "fusion":
            called = mod.computations.get(use.callee("calls") or "")
            if called is None:
                return False
            inner_users = _users(called)
            slots = [k for k, op in enumerate(use.operands) if op == name]
            params = _parameters(called)
            root = called.root
            for k in slots:
                pname = params.get(k)
                if pname is None:
                    return False
                if not _inside_fusion(called, pname, elements, n, inner_users, root.name):
                    return False
                # If the value reaches the root unsliced, the fusion's output carries it on.
                if _reaches(called, pname, root.name, inner_users):
                    if _elements(use.type_text) != elements:
                        return False
                    if not _only_sharded(mod, comp, use.name, elements, n, users, depth + 1):
                        return False
        else:
            return False
    return True


def _reaches(comp: Computation, start: str, target: str, users: dict[str, list[Instruction]]) -> bool:
    """Whether ``start`` flows to ``target`` without passing a dynamic-slice."""
    stack, seen = [start], set()
    while stack:
        cur = stack.pop()
        if cur == target:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        stack.extend(u.name for u in users.get(cur, []) if u.opcode != "dynamic-slice")
    return False


def _inside_fusion(
    comp: Computation, name: str, elements: int, n: int, users: dict[str, list[Instruction]], root: str
) -> bool:
    """Inside a fused computation: every path from ``name`` is elementwise/layout until a
    1/n dynamic-slice or the root."""
    stack, seen = [name], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if cur == root and cur != name:
            continue
        for use in users.get(cur, []):
            if use.opcode == "dynamic-slice":
                if use.operands[0] != cur or _elements(use.type_text) * n != elements:
                    return False
            elif use.opcode in _PASS_THROUGH and _elements(use.type_text) == elements:
                stack.append(use.name)
            else:
                return False
    return True


def _element_uses(ins: Instruction, users: dict[str, list[Instruction]]) -> list[list[str]] | None:
    """Per result element, the names that carry it (the op itself, or its get-tuple-elements);
    None when a tuple result is used whole."""
    if not ins.type_text.startswith("("):
        return [[ins.name]]
    count = len(array_shapes(ins.type_text))
    out: list[list[str]] = [[] for _ in range(count)]
    for u in users.get(ins.name, []):
        if u.opcode != "get-tuple-element":
            return None
        k = _tuple_index(u)
        if k is None or k >= count:
            return None
        out[k].append(u.name)
    return out


def _sliced(
    mod: HloModule, comp: Computation, ins: Instruction, n: int, users: dict[str, list[Instruction]]
) -> tuple[bool, ...]:
    """Per element of an all-reduce: whether its result is only used as this device's 1/n shard."""
    shapes = array_shapes(ins.type_text)
    uses = _element_uses(ins, users)
    if n <= 1 or uses is None:
        return (False,) * len(shapes)
    return tuple(
        bool(names) and all(_only_sharded(mod, comp, g, math.prod(shape), n, users) for g in names)
        for (_, shape), names in zip(shapes, uses)
    )


_LAYOUT = {"bitcast", "copy", "reshape", "transpose"}
_NARROW_FLOATS = {"bf16", "f16", "f8e4m3fn", "f8e5m2", "f8e4m3", "f8e4m3fnuz", "f8e5m2fnuz"}


def _dtype_of(type_text: str) -> str | None:
    arrays = array_shapes(type_text)
    return arrays[0][0] if len(arrays) == 1 else None


def _widened_from(mod: HloModule, table: dict[str, Instruction], name: str, depth: int = 0) -> str | None:
    """The narrower float type a value was converted up from (through layout ops and into the
    fusion that produced it), or None."""
    ins = table.get(name)
    if ins is None or depth > 16:
        return None
    if (ins.opcode in _LAYOUT or ins.opcode in ("slice", "dynamic-slice")) and ins.operands:
        # Moving or slicing values keeps them exactly what they were.
        return _widened_from(mod, table, ins.operands[0], depth + 1)
    if ins.opcode == "convert" and ins.operands:
        src = table.get(ins.operands[0])
        before = _dtype_of(src.type_text) if src is not None else None
        after = _dtype_of(ins.type_text)
        if before in _NARROW_FLOATS and after in _BITS and _BITS[after] > _BITS[before]:
            return before
        return None
    if ins.opcode == "select" and len(ins.operands) == 3:
        # A masked value (select against a constant such as 0) keeps the narrow values.
        found = [_widened_from(mod, table, op, depth + 1) or _small_constant(table, op) for op in ins.operands[1:]]
        narrow = {f for f in found if f not in (None, "const")}
        return narrow.pop() if None not in found and len(narrow) == 1 else None
    if ins.opcode == "fusion":
        called = mod.computations.get(ins.callee("calls") or "")
        if called is not None:
            return _widened_from(mod, called.by_name(), called.root.name, depth + 1)
    return None


def _parameters(comp: Computation) -> dict[int, str]:
    """Parameter number -> instruction name inside a called computation (a fusion's body)."""
    return {_ints(i.operand_text)[0]: i.name for i in comp.instructions if i.opcode == "parameter"}


def _small_constant(table: dict[str, Instruction], name: str) -> str | None:
    """ "const" if ``name`` is a (broadcast) scalar constant that every float type holds exactly
    (an integer below 256 in magnitude), else None."""
    ins = table.get(name)
    while ins is not None and ins.opcode == "broadcast" and ins.operands:
        ins = table.get(ins.operands[0])
    if ins is None or ins.opcode != "constant":
        return None
    try:
        value = float(ins.operand_text)
    except ValueError:
        return None
    return "const" if value.is_integer() and abs(value) < 256 else None


def _narrowed_to(
    mod: HloModule, comp: Computation, name: str, dtype: str, users: dict[str, list[Instruction]], depth: int = 0
) -> bool:
    """Whether every use of ``name`` converts it straight down to ``dtype`` (through layout ops
    and slices, also inside the fusions that take it)."""
    uses = users.get(name, [])
    if not uses or depth > 16:
        return False
    for use in uses:
        if use.opcode == "convert":
            if _dtype_of(use.type_text) != dtype:
                return False
        elif use.opcode in _LAYOUT or use.opcode in ("dynamic-slice", "slice"):
            if use.operands[0] != name or not _narrowed_to(mod, comp, use.name, dtype, users, depth + 1):
                return False
        elif use.opcode == "fusion":
            called = mod.computations.get(use.callee("calls") or "")
            if called is None:
                return False
            inner = _users(called)
            params = _parameters(called)
            for k, op in enumerate(use.operands):
                if op == name and not _narrowed_to(mod, called, params.get(k, ""), dtype, inner, depth + 1):
                    return False
        else:
            return False
    return True


def _program_dtypes(
    mod: HloModule,
    comp: Computation,
    ins: Instruction,
    kind: str,
    table: dict[str, Instruction],
    users: dict[str, list[Instruction]],
) -> tuple[str | None, ...]:
    """Per element: the narrow float type the program gave it, where the backend widened the
    collective around it. An op that only moves data (all-gather, all-to-all, permute) needs an
    operand converted up from that type (its values are exactly representable in it); a
    reduction also needs every result converted straight back to it."""
    shapes = array_shapes(ins.type_text) if not ins.opcode.endswith("-start") else []
    uses = _element_uses(ins, users) if shapes else None
    if uses is None or len(ins.operands) != len(shapes):
        return ()
    reduces = kind in ("all-reduce", "reduce-scatter")
    # XLA's all-reduce promotion pass (which widens the collectives a backend cannot run
    # narrow) names the widened reduction "<name>_promoted": then a narrow operand is enough.
    promoted = reduces and "promoted" in (ins.callee("to_apply") or "")
    out = []
    for op, names in zip(ins.operands, uses):
        narrow = _widened_from(mod, table, op)
        ok = narrow is not None and (
            not reduces or promoted or (bool(names) and all(_narrowed_to(mod, comp, g, narrow, users) for g in names))
        )
        out.append(narrow if ok else None)
    return tuple(out)


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
    ctxs: list[_Context],
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
        body = _balanced(text, "{", "}")
        pairs = tuple((s, t) for s, t in (_ints(p) for p in re.findall(r"\{([^{}]*)\}", body[1:-1])))
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
    first = ctxs[0] if ctxs else _Context(1, (), False)
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
        sliced=_sliced(mod, comp, ins, size, users) if kind == "all-reduce" else (),
        program_dtypes=_program_dtypes(mod, comp, ins, kind, table, users),
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
    ctxs = _contexts(mod)
    out = []
    for comp in mod.computations.values():
        if comp.name not in ctxs:
            continue
        table, users = comp.by_name(), None
        for ins in comp.instructions:
            kind = _kind(ins.opcode)
            if kind is None:
                continue
            users = users or _users(comp)
            out.append(_collective(mod, comp, ins, kind, table, users, ctxs[comp.name]))
    return tuple(out)
