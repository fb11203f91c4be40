"""Readings of XLA:CPU's collectives as a GPU or TPU backend would emit them, each inferred
from how an op's operands are produced and its results used, and kept apart from the op as
compiled:

* an all-reduce whose results are only used through a dynamic-slice that keeps 1/n of them is a
  reduce-scatter (XLA:CPU leaves this pattern, even for a plain ``psum`` then slice of
  ``axis_index``, where GPU and TPU backends emit a reduce-scatter);
* XLA:CPU has no bf16 collectives and widens them to f32 (converting the operand up and, for
  reductions, the result back down, or naming the widened reduction ``*_promoted``); such an
  element counts in the narrow dtype the program gave it, as a backend with bf16 collectives
  would send it.
"""

from __future__ import annotations

import math

from mlsys_jax.analysis.hlo_module import (
    BITS,
    PASS_THROUGH,
    Computation,
    HloModule,
    Instruction,
    array_shapes,
    element_count,
    ints,
    tuple_index,
    users_of,
)


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
            if use.operands[0] != name or element_count(use.type_text) * n != elements:
                return False
        elif use.opcode in PASS_THROUGH:
            if element_count(use.type_text) != elements:
                return False
            if not _only_sharded(mod, comp, use.name, elements, n, users, depth + 1):
                return False
        elif use.opcode == "fusion":
            called = mod.computations.get(use.callee("calls") or "")
            if called is None:
                return False
            inner_users = users_of(called)
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
                    if element_count(use.type_text) != elements:
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
                if use.operands[0] != cur or element_count(use.type_text) * n != elements:
                    return False
            elif use.opcode in PASS_THROUGH and element_count(use.type_text) == elements:
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
        k = tuple_index(u)
        if k is None or k >= count:
            return None
        out[k].append(u.name)
    return out


def sliced_elements(
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
        if before in _NARROW_FLOATS and after in BITS and BITS[after] > BITS[before]:
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
    return {ints(i.operand_text)[0]: i.name for i in comp.instructions if i.opcode == "parameter"}


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
            inner = users_of(called)
            params = _parameters(called)
            for k, op in enumerate(use.operands):
                if op == name and not _narrowed_to(mod, called, params.get(k, ""), dtype, inner, depth + 1):
                    return False
        else:
            return False
    return True


def program_dtypes_of(
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
