"""Fit a mesh preset's devices to a strategy: axes the strategy does not use fold into one it does."""

from __future__ import annotations

import dataclasses

from mlsys_jax.mesh import parse_axis_sizes
from mlsys_jax.meshes import AXIS_NAMES, MeshAxis, MeshPreset, load_preset
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.rules import STRATEGY_AXES


def strategy_axes(strategy: str, sequence_parallel: bool = False) -> tuple[str, ...]:
    if strategy not in STRATEGY_AXES:
        raise PlanError(f"unknown strategy {strategy!r}; the presets are {sorted(STRATEGY_AXES)}")
    axes = STRATEGY_AXES[strategy]
    return axes + ("sequence",) if sequence_parallel else axes


def fit_preset(preset: MeshPreset, strategy: str, sequence_parallel: bool = False) -> MeshPreset:
    """The same devices laid out for ``strategy``.

    Axes of size > 1 that the strategy leaves unused are folded into the strategy's outermost
    axis other than ``pipeline`` (with their slices), so ``--strategy fsdp`` on an 8-device preset shards over all 8
    rather than replicating work over the unused axes.
    """
    used = strategy_axes(strategy, sequence_parallel)
    unused = [a for a in preset.axes if a.name not in used and a.size > 1]
    if not unused:
        return preset
    # Spare devices join the outermost axis that shards work within a stage, not the pipeline.
    target = next((a for a in used if a != "pipeline"), used[0])
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


def resolve_mesh(
    mesh: str, strategy: str | None = None, sequence_parallel: bool = False
) -> tuple[MeshPreset | None, dict[str, int], str]:
    """Read a ``--mesh`` value (preset name or ``"axis=size,..."``) with a ``--strategy``.

    Returns the preset fitted to the strategy (None for explicit sizes), the axis sizes to
    build, and the strategy: the preset's own when none is given; for explicit sizes, the one
    whose axes are exactly the sizes above 1.
    """
    if any(c in mesh for c in "=:,"):
        sizes = parse_axis_sizes(mesh)
        if strategy is None:
            active = {k for k, v in sizes.items() if v > 1 and k != "sequence"}
            matches = [n for n, axes in STRATEGY_AXES.items() if set(axes) == active]
            strategy = matches[0] if matches else "dp_fsdp_tp"
        strategy_axes(strategy, sequence_parallel)
        return None, sizes, strategy
    preset = load_preset(mesh)
    strategy = strategy or preset.strategy
    fitted = fit_preset(preset, strategy, sequence_parallel)
    return fitted, fitted.axis_sizes, strategy
