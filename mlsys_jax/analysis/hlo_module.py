"""Compiled (optimized) HLO text as a module of computations and instructions, with the trip
count of every loop and the call contexts of every computation: what the collective reader and
its CPU readings walk.

Measured: instruction names, opcodes, types and operands as the text gives them, replica groups
(explicit or iota form), and the ``known_trip_count`` XLA records on each ``while``. Inferred: a
trip count XLA did not record, from the loop's condition (``i < N``, constant start/step).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

BITS = {
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

ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_NAME = re.compile(r"%([\w.\-]+)")


class HloParseError(ValueError):
    """HLO text this module cannot read (it names the instruction and what was expected)."""


# ---- shapes and replica groups ------------------------------------------------------------


def array_shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in an HLO type (``f32[8,16]{1,0}`` or a tuple of them) as (dtype, dims)."""
    out = []
    for dtype, dims in ARRAY.findall(type_text):
        if dtype not in BITS:
            continue
        shape = tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
        out.append((dtype, shape))
    return out


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of one array (sub-byte types rounded up)."""
    return (math.prod(shape) * BITS[dtype] + 7) // 8


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


def ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _parse_iota(text: str) -> tuple[list[int], list[int], str]:
    """``[4,2]<=[2,4]T(1,0)`` (or ``[2,2,2]T(0,2,1)``, reshape dims left out) -> (shape,
    device list, rest of text)."""
    m = re.match(r"\[([\d,]*)\](?:<=\[([\d,]*)\])?(?:T\(([\d,]*)\))?", text)
    if not m:
        raise HloParseError(f"cannot read iota device list {text[:60]!r}")
    shape = ints(m.group(1))
    dims = ints(m.group(2)) if m.group(2) is not None else shape
    perm = ints(m.group(3)) if m.group(3) is not None else None
    return shape, _iota(dims, perm), text[m.end() :]


def balanced(text: str, open_ch: str, close_ch: str) -> str:
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
        body = balanced(rest[len("device_ids=") :], "(", ")")
        inner = body[1:-1].strip()
        devices = _parse_iota(inner)[1] if inner.startswith("[") else ints(inner)
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
        body = balanced(text, "{", "}")[1:-1].strip()
        if not body:
            return (tuple(range(num_devices)),)
        return tuple(tuple(ints(g)) for g in re.findall(r"\{([^{}]*)\}", body))
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
        type_text = balanced(rest, "(", ")")
    else:
        type_text = rest.split(" ", 1)[0]
    rest = rest[len(type_text) :]
    om = _OPCODE.match(rest)
    if not om:
        return None
    opcode = om.group(1)
    ops = balanced(rest[om.end() - 1 :], "(", ")")
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
            vals = ints(ins.operand_text)
            return vals[0] if len(vals) == 1 else None
        if ins.opcode in ("copy", "convert", "bitcast", "reshape") and ins.operands:
            name, seen = ins.operands[0], seen + 1
            continue
        return None
    return None


def tuple_index(ins: Instruction) -> int | None:
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
            k = ints(p.operand_text)[0]
            mapped.append(ins.operands[k] if k < len(ins.operands) else None)
        elif p is not None and p.opcode == "constant":
            mapped.append(f"__const__{ints(p.operand_text)[0]}" if ints(p.operand_text) else None)
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
            idx = tuple_index(ins)
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
class CallContext:
    """One way a computation is reached: ``count`` runs per step through loops of ``trips``,
    under a conditional or not; ``share`` is the expected share of those runs that happen when
    each conditional on the way picks its branches evenly (1/k per k-way conditional)."""

    count: int
    trips: tuple[int | None, ...]
    conditional: bool
    share: float = 1.0


def call_contexts(mod: HloModule) -> dict[str, list[CallContext]]:
    """Every way each computation is reached from ENTRY, with the loop trip counts on the way."""
    out: dict[str, list[CallContext]] = {mod.entry: [CallContext(1, (), False)]}
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
                for c in _NAME.findall(balanced(branches, "{", "}")):
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
                trips, count, cond, share = ctx.trips, ctx.count, ctx.conditional, ctx.share
                if ins.opcode == "while" and key in ("body", "condition"):
                    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
                    n = int(m.group(1)) if m else derive_trip_count(mod, comp, ins)
                    trips = trips + (n,)
                    count = count * (n if n is not None else 1)
                    if key == "condition" and n is not None:
                        count = ctx.count * (n + 1)
                elif key in ("true_computation", "false_computation", "branch"):
                    cond = True
                    branches = ins.attr("branch_computations")
                    share /= len(_NAME.findall(balanced(branches, "{", "}"))) if branches else 2
                out.setdefault(callee, []).append(CallContext(count, trips, cond, share))
    return out


# ---- collectives --------------------------------------------------------------------------

PASS_THROUGH = {
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


def element_count(type_text: str) -> int:
    return sum(math.prod(s) for _, s in array_shapes(type_text))


def users_of(comp: Computation) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for ins in comp.instructions:
        for op in set(ins.operands):
            users.setdefault(op, []).append(ins)
    return users
