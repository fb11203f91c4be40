"""A plan places a model on a mesh: rules turn logical axes into mesh axes, and every placement
is checked before anything compiles.

``Plan`` is the one place that decides shardings. It resolves a parameter's or activation's
logical axes to a ``PartitionSpec``, refuses placements that cannot work with a message that
names the array, its shape, the axis, the mesh size and a fix, materializes parameters already
sharded, and reports bytes per device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from mlsys_jax.hints import did_you_mean
from mlsys_jax.meshes import AXIS_NAMES, Device
from mlsys_jax.models.base import Layout
from mlsys_jax.models.registry import declared_axes
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.rules import MeshAxes, Rules
from mlsys_jax.params import init_params, is_spec, spec_leaves


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one parameter lives: its spec, its mesh placement and its bytes per device."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str | None, ...]
    spec: PartitionSpec
    shard_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    @property
    def bytes_per_device(self) -> int:
        return math.prod(self.shard_shape) * jnp.dtype(self.dtype).itemsize


def _as_tuple(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _fmt(target: MeshAxes) -> str:
    axes = _as_tuple(target)
    if not axes:
        return "None (replicated)"
    return repr(axes[0]) if len(axes) == 1 else repr(axes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh and the rules that place a model on it (plus, optionally, the hardware behind it).

    The mesh may be an ``AbstractMesh`` for planning without devices: shardings, placements and
    bytes per device all work; ``init`` needs real devices.
    """

    mesh: Mesh | AbstractMesh
    rules: Rules
    device: Device | None = None

    def __post_init__(self) -> None:
        for kind in ("param", "activation"):
            declared = declared_axes(kind)
            for name, target in self.rules.table(kind):
                if name not in declared:
                    hint = did_you_mean(name, sorted(declared))
                    raise PlanError(
                        f"the {self.rules.name!r} {kind} rule {name!r} -> {_fmt(target)} names a "
                        f"logical axis no registered model family declares, so it would place "
                        f"nothing.{hint} Fix: correct the name, or register the family whose "
                        f"{kind}s name it (mlsys_jax.models.register_family)."
                    )

    # ---- resolution -----------------------------------------------------------------------
    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def num_devices(self) -> int:
        return math.prod(self.axis_sizes.values())

    def _lookup(self, name: str, kind: str, what: str, path: str, shape: Any) -> MeshAxes:
        """The mesh axes the rules give logical axis ``name``: a rule's target, else None (whole)
        for an axis some registered model family declares; any other name is refused here."""
        table = self.rules.table(kind)
        targets = []
        for logical, target in table:
            if logical == name and _as_tuple(target) not in [_as_tuple(t) for t in targets]:
                targets.append(target)
        if not targets:
            declared = declared_axes(kind)
            if name in declared:
                return None
            known = sorted({k for k, _ in table} | declared)
            hint = did_you_mean(name, known)
            raise PlanError(
                f"{what} '{path}' of shape {shape} names logical axis {name!r}, which no registered "
                f"model family declares and the {self.rules.name!r} {kind} rules do not map.{hint} "
                f"Known {kind} axes: {known}. Fix: correct the name, declare it in the model "
                f"family's logical axes, or add a rule, e.g. "
                f"rules.override({kind}s={{{name!r}: None}}) to keep it whole."
            )
        if len(targets) > 1:
            raise PlanError(
                f"conflicting {kind} rules for logical axis {name!r} (used by {what} '{path}' of "
                f"shape {shape}): it maps to {' and to '.join(_fmt(t) for t in targets)}. "
                f"Fix: keep one rule per logical axis, e.g. "
                f"rules.override({kind}s={{{name!r}: {_as_tuple(targets[0])!r}}})."
            )
        return targets[0]

    def resolve(
        self,
        logical_axes: Sequence[str | None],
        shape: Sequence[int] | None = None,
        *,
        kind: str = "param",
        path: str = "<array>",
    ) -> PartitionSpec:
        """The ``PartitionSpec`` the rules give an array, or a ``PlanError`` saying why none works.

        ``kind`` is ``"param"`` or ``"activation"`` (which rule table applies). Mesh axes of size
        1 are left out of the spec; a known mesh axis missing from the mesh counts as size 1.
        """
        what = "parameter" if kind == "param" else "activation"
        shape_t = tuple(shape) if shape is not None else None
        if shape_t is not None and len(shape_t) != len(logical_axes):
            raise PlanError(
                f"{what} '{path}' has shape {shape_t} ({len(shape_t)} dims) but logical axes "
                f"{tuple(logical_axes)} ({len(logical_axes)} names). Fix: give one logical axis "
                "per dim (None for a dim that is never sharded)."
            )
        sizes = self.axis_sizes
        used: dict[str, tuple[int, str]] = {}
        entries: list[MeshAxes] = []
        for dim, name in enumerate(logical_axes):
            if name is None:
                entries.append(None)
                continue
            target = self._lookup(name, kind, what, path, shape_t)
            present = []
            for axis in _as_tuple(target):
                if axis not in sizes:
                    if axis in AXIS_NAMES:
                        continue
                    hint = did_you_mean(axis, list(sizes))
                    raise PlanError(
                        f"the {kind} rule {name!r} -> {_fmt(target)} used by {what} '{path}' of "
                        f"shape {shape_t} names mesh axis {axis!r}, which the mesh "
                        f"{sizes} does not have.{hint} Fix: map {name!r} to one of "
                        f"{list(sizes)} or to None."
                    )
                if axis in used:
                    other_dim, other = used[axis]
                    raise PlanError(
                        f"{what} '{path}' of shape {shape_t} maps mesh axis {axis!r} "
                        f"(size {sizes[axis]}) to both dim {other_dim} ({other!r}) and dim {dim} "
                        f"({name!r}); one mesh axis can shard only one dim of an array. Fix: map "
                        f"one of them elsewhere, e.g. rules.override({kind}s={{{name!r}: None}})."
                    )
                used[axis] = (dim, name)
                present.append(axis)
            shards = math.prod(sizes[a] for a in present)
            if shape_t is not None and shape_t[dim] % shards:
                size = shape_t[dim]
                fits = [d for d in range(2, shards) if size % d == 0 and shards % d == 0]
                smaller = f"use a mesh where those axes multiply to {max(fits)} (a divisor of both), " if fits else ""
                raise PlanError(
                    f"cannot shard {what} '{path}' of shape {shape_t}: dim {dim} ({name!r}, size "
                    f"{size}) maps to mesh axes {tuple(present)} of total size {shards}, which "
                    f"does not divide {size}. Fix: {smaller}change the {name!r} size to a "
                    f"multiple of {shards}, or replicate it with "
                    f"rules.override({kind}s={{{name!r}: None}})."
                )
            kept = tuple(a for a in present if sizes[a] > 1)
            entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # ---- parameters -----------------------------------------------------------------------
    def placements(self, specs: Any) -> list[Placement]:
        """Every parameter's placement, checked; the first that cannot work raises."""
        out = []
        sizes = self.axis_sizes
        for path, s in spec_leaves(specs):
            pspec = self.resolve(s.logical_axes, s.shape, kind="param", path=path)
            shard = list(s.shape)
            for dim, entry in enumerate(pspec):
                shard[dim] //= math.prod(sizes[a] for a in _as_tuple(entry))
            out.append(Placement(path, s.shape, s.dtype, s.logical_axes, pspec, tuple(shard)))
        return out

    def param_pspecs(self, specs: Any) -> Any:
        """A tree of ``PartitionSpec`` matching the spec tree."""
        placements = iter(self.placements(specs))
        return jax.tree_util.tree_map(lambda _: next(placements).spec, specs, is_leaf=is_spec)

    def param_shardings(self, specs: Any) -> Any:
        """A tree of ``NamedSharding`` matching the spec tree."""
        return jax.tree_util.tree_map(self.sharding, self.param_pspecs(specs))

    def abstract_params(self, specs: Any) -> Any:
        """``ShapeDtypeStruct`` with sharding for each parameter (for AOT compiles and restores)."""
        shardings = self.param_shardings(specs)
        return jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            specs,
            shardings,
            is_leaf=is_spec,
        )

    def init(self, specs: Any, key: jax.Array) -> Any:
        """Materialize parameters directly into their shardings: no device ever holds the whole
        model. Values depend only on ``key``, not on the mesh."""
        if isinstance(self.mesh, AbstractMesh):
            raise PlanError(
                "this plan's mesh is abstract (for planning); build it with make_mesh(...) on real "
                "or simulated devices to initialize parameters"
            )
        shardings = self.param_shardings(specs)
        return jax.jit(lambda k: init_params(specs, k), out_shardings=shardings)(key)

    # ---- activations ----------------------------------------------------------------------
    def activation_spec(
        self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, name: str = "<activation>"
    ) -> PartitionSpec:
        return self.resolve(logical_axes, shape, kind="activation", path=name)

    def activation_sharding(
        self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, name: str = "<activation>"
    ) -> NamedSharding:
        return self.sharding(self.activation_spec(logical_axes, shape, name))

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None], name: str = "<activation>") -> jax.Array:
        """Annotate an activation with the sharding its logical axes get under the rules."""
        spec = self.activation_spec(logical_axes, x.shape, name)
        return jax.lax.with_sharding_constraint(x, self.sharding(spec))

    @property
    def layout(self) -> Layout:
        """What a model's pieces are handed: this plan's activation constraint, and its mesh and
        activation specs for kernels that run per shard."""
        return Layout(constrain=self.constrain, mesh=self.mesh, spec=self.activation_spec)

    def replicated(self) -> NamedSharding:
        return self.sharding(PartitionSpec())

    @property
    def batch_shards(self) -> int:
        """How many ways the activations' ``batch`` dim is split."""
        return self.shards_of("batch")

    def shards_of(self, logical: str) -> int:
        """How many ways the activations' ``logical`` dim is split."""
        spec = self.activation_spec((logical,))
        return math.prod(self.axis_sizes[a] for a in _as_tuple(spec[0] if len(spec) else None))

    def describe_mesh(self) -> str:
        shown = {k: v for k, v in self.axis_sizes.items() if v > 1} or {"data": 1}
        return ", ".join(f"{k}={v}" for k, v in shown.items())


__all__ = ["Placement", "Plan", "PlanError"]
