"""Gradient synchronization over the data axis with our own all-reduce algorithms.

A train step that syncs its gradients itself runs its loss and backward per data-parallel
replica (``shard_map`` manual over the data axis only, so FSDP and tensor axes stay with the
partitioner) and marks each layer's weights with ``synced``: an identity whose backward sums the
weights' gradient over the data axis with the chosen algorithm. Inside the layer scan the mark
sits on one layer's weights, so layer l's reduction is issued during the backward scan right
after layer l's gradient exists, where hardware that overlaps can hide it behind layer l-1's
backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

from mlsys_jax.comm.algorithms import (
    halving_doubling_all_reduce,
    parameter_server_step,
    ring_all_reduce,
    sliced_all_reduce,
)

#: ``grad_sync`` choices: XLA's own all-reduce, or one of ours.
GRAD_SYNCS: tuple[str, ...] = ("xla", "ring", "tree", "hierarchical", "ps")

#: The ``comm.models`` algorithm each of ours prices as.
COST_ALGORITHM: dict[str, str] = {
    "ring": "ring",
    "tree": "halving_doubling",
    "hierarchical": "hierarchical",
    "ps": "parameter_server",
}

Reduce = Callable[[jax.Array], jax.Array]


class GradSyncError(ValueError):
    """A gradient-sync choice that cannot run on the mesh or plan it was given."""


def check_grad_sync(name: str, data_size: int = 1, slice_size: int | None = None) -> None:
    """Refuse an unknown choice, or a hierarchical one whose slices do not divide the data axis."""
    if name not in GRAD_SYNCS:
        raise GradSyncError(f"grad_sync={name!r} is not one of {list(GRAD_SYNCS)}. Fix: pick one of those.")
    if name == "hierarchical" and slice_size is not None and (slice_size < 1 or data_size % slice_size):
        raise GradSyncError(
            f"grad_sync='hierarchical' with slices of {slice_size} devices cannot cut a data axis of "
            f"{data_size} devices. Fix: a slice size that divides {data_size}."
        )


def default_slice_size(data_size: int, slices: int = 1) -> int:
    """Devices per slice for the hierarchical sum: the preset's slices when the data axis spans
    several, else two halves (the smallest hierarchy that is not a plain ring)."""
    if slices > 1 and data_size % slices == 0:
        return data_size // slices
    return data_size // 2 if data_size % 2 == 0 and data_size > 2 else data_size


def preset_slice_size(preset: Any) -> int | None:
    """Devices per slice of a mesh preset's data axis when it spans several slices (the
    hierarchical sum's inner ring), else None."""
    axis = next((a for a in preset.axes if a.name == "data"), None) if preset is not None else None
    return axis.size // axis.slices if axis is not None and axis.slices > 1 else None


def describe(name: str, data_size: int, slice_size: int | None = None) -> str:
    """One line saying how a run sums its gradients over the data axis."""
    if name == "xla":
        return f"XLA's all-reduce over data={data_size}"
    how = {
        "ring": "ring (reduce-scatter, then all-gather)",
        "tree": "tree (recursive halving-doubling)",
        "hierarchical": f"hierarchical (slices of {slice_size or data_size} devices, then across them)",
        "ps": "ps (each shard pushed to its owner, the sums pulled back)",
    }[name]
    return f"{how} over data={data_size}, each layer's sum issued in the backward layer scan"


def _server_sum(x: jax.Array, axis: str) -> jax.Array:
    """Push each shard of ``x`` to the device that owns it, which sums what it receives, then
    pull every owner's sum back: the parameter server's push/pull, with the sum as the update."""
    return parameter_server_step(x, x, lambda _, total: total, axis)


def reducer(name: str, axis: str, slice_size: int | None = None) -> Reduce:
    """The sum over ``axis`` that ``name`` stands for, for one array, inside ``shard_map``."""
    check_grad_sync(name)
    if name == "ring":
        return lambda x: ring_all_reduce(x, axis)
    if name == "tree":
        return lambda x: halving_doubling_all_reduce(x, axis)
    if name == "hierarchical":
        return lambda x: sliced_all_reduce(x, axis, slice_size or jax.lax.axis_size(axis))
    if name == "ps":
        return lambda x: _server_sum(x, axis)
    return lambda x: jax.lax.psum(x, axis)


def on_local_shards(reduce: Reduce, spec: Any) -> Reduce:
    """``reduce`` run on each device's own shard of an array placed by ``spec`` (a
    ``PartitionSpec`` over axes the partitioner still places, e.g. fsdp or tensor, inside a
    ``shard_map`` already manual over the summed axis): the sum never reshapes a sharded array,
    which would make the partitioner move shards around it."""
    axes = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}
    if not axes:
        return reduce
    return lambda x: jax.shard_map(
        reduce,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=spec,
        out_specs=spec,
        axis_names=axes,
        check_vma=False,
    )(x)


def synced(reduce: Reduce, specs: Any = None) -> Callable[[Any], Any]:
    """An identity on a tree of weights whose backward sums each gradient with ``reduce``; with
    ``specs`` (a matching tree of ``PartitionSpec``), on each device's own shard of it."""
    is_spec = lambda x: isinstance(x, PartitionSpec)

    @jax.custom_vjp
    def mark(tree: Any) -> Any:
        return tree

    def forward(tree: Any) -> tuple[Any, None]:
        return tree, None

    def backward(_: None, cotangent: Any) -> tuple[Any]:
        if specs is None:
            return (jax.tree_util.tree_map(reduce, cotangent),)
        sums = jax.tree_util.tree_map(lambda spec: on_local_shards(reduce, spec), specs, is_leaf=is_spec)
        return (jax.tree_util.tree_map(lambda f, ct: f(ct), sums, cotangent),)

    mark.defvjp(forward, backward)
    return mark


__all__ = [
    "COST_ALGORITHM",
    "GRAD_SYNCS",
    "GradSyncError",
    "check_grad_sync",
    "default_slice_size",
    "describe",
    "on_local_shards",
    "preset_slice_size",
    "reducer",
    "synced",
]
