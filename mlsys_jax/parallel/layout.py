"""Fit a mesh preset's devices to a strategy: axes the strategy does not use fold into one it does."""

from __future__ import annotations

import dataclasses

from mlsys_jax.meshes import AXIS_NAMES, MeshAxis, MeshPreset
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.rules import STRATEGY_AXES


def strategy_axes(strategy: str, sequence_parallel: bool = False) -> tuple[str, ...]:
    if strategy not in STRATEGY_AXES:
        raise PlanError(
            f"unknown strategy {strategy!r}; the presets are {sorted(STRATEGY_AXES)}"
        )
    axes = STRATEGY_AXES[strategy]
    return axes + ("sequence",) if sequence_parallel else axes


def fit_preset(preset: MeshPreset, strategy: str, sequence_parallel: bool = False) -> MeshPreset:
    """The same devices laid out for ``strategy``.

    Axes of size > 1 that the strategy leaves unused are folded into the strategy's outermost
    axis (with their slices), so ``--strategy fsdp`` on an 8-device preset shards over all 8
    rather than replicating work over the unused axes.
    """
    used = strategy_axes(strategy, sequence_parallel)
    unused = [a for a in preset.axes if a.name not in used and a.size > 1]
    if not unused:
        return preset
    target = used[0]
    size, slices = 1, 1
    for a in unused:
        size *= a.size
        slices *= a.slices
    kept = {a.name: a for a in preset.axes if a.name in used}
    base = kept.get(target, MeshAxis(target, 1, preset.axes[0].link))
    link = next((a.link for a in unused if a.slices > 1), base.link)
    kept[target] = MeshAxis(target, base.size * size, link, base.slices * slices)
    axes = tuple(sorted(kept.values(), key=lambda a: AXIS_NAMES.index(a.name)))
    return dataclasses.replace(preset, axes=axes, strategy=strategy)
