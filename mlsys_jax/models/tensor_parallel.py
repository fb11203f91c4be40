"""A block's tensor-parallel projections as collective matmuls, in Megatron's sequence-parallel
pattern.

With ``tp_matmul="collective"`` a block's residual stream keeps its tokens split over the
``tensor`` mesh axis along the sequence (norms run on each device's tokens). The column-parallel
projections (q, k and v; gate and up) gather the token rows ring-wise while multiplying them by
this device's column shard of the weight (``all_gather_matmul``), and the row-parallel ones (the
attention output; down) pass partial sums around the ring so that each device keeps its own
tokens of the summed output (``matmul_reduce_scatter``). Each projection group (q/k/v, the
attention output, the whole MLP) is one ``jax.shard_map`` over the plan's mesh whose rings run
over ``tensor``; the batch stays split as the plan splits it, and weights split over fsdp as well
are gathered over it beforehand, as the einsums gather them. Attention and norms run outside,
through ``kernel_ops``. Where ``sequence_parallel`` finds no such split the model keeps its plain
einsums.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlsys_jax.comm.collective_matmul import all_gather_matmul, matmul_reduce_scatter
from mlsys_jax.kernels.sharding import mesh_axes
from mlsys_jax.models.base import Layout
from mlsys_jax.models.layers import gated, qkv_weight, split_qkv

TENSOR = "tensor"
RESIDUAL = ("batch", "seq", "embed")


def tensor_size(layout: Layout) -> int:
    """The size of the layout's ``tensor`` mesh axis (1 when unsharded or absent)."""
    return int(dict(layout.mesh.shape).get(TENSOR, 1)) if layout.sharded else 1


def _entry(axes: Sequence[str]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _with_tensor_on_seq(spec: P, logical_axes: Sequence[str | None]) -> P:
    """``spec`` with ``tensor`` added (innermost) to its ``seq`` dim, where the array has one and
    no dim uses ``tensor`` yet: gathering over ``tensor`` then gives back the seq dim's shard
    under ``spec``."""
    entries = list(tuple(spec) + (None,) * (len(logical_axes) - len(spec)))
    if "seq" not in logical_axes or any(TENSOR in mesh_axes(e) for e in entries):
        return spec
    dim = list(logical_axes).index("seq")
    entries[dim] = _entry((*mesh_axes(entries[dim]), TENSOR))
    return P(*entries)


def sequence_parallel(layout: Layout, shape: Sequence[int], widths: Sequence[int]) -> Layout | None:
    """``layout`` with the sequence also split over ``tensor``: where a block's residual stream
    (batch, seq, embed) of ``shape`` and its norms live under the collective matmuls. None (keep
    the plain einsums) when the layout is unsharded, its tensor axis is 1, the tokens do not
    split evenly over it along the sequence, it does not divide every projection ``width``
    (heads, K/V heads, mlp), or the residual stream already uses it or splits its features."""
    n = tensor_size(layout)
    if n == 1 or any(size % n for size in widths):
        return None
    assert layout.spec is not None
    base_spec = layout.spec
    batch, seq, embed = (tuple(base_spec(RESIDUAL, tuple(shape), "residual stream")) + (None,) * 3)[:3]
    seq_shards = math.prod(layout.mesh.shape[a] for a in mesh_axes(seq)) * n
    if embed is not None or TENSOR in mesh_axes(batch) + mesh_axes(seq) or shape[1] % seq_shards:
        return None

    def spec(logical_axes: Sequence[str | None], shape: Any = None, name: str = "<activation>") -> P:
        return _with_tensor_on_seq(base_spec(logical_axes, shape, name), logical_axes)

    def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
        return lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec(logical_axes, x.shape)))

    return dataclasses.replace(layout, constrain=constrain, spec=spec)


class _Specs(NamedTuple):
    """Where a projection group's activations live, per shard of the residual stream."""

    tokens: P  # (batch, seq, features): this device's tokens, features whole
    heads: P  # (batch, seq, heads, head_dim): the tokens gathered over tensor, heads split over it


COLUMNS = P(None, TENSOR)  # a (d, f) or (d, heads, head_dim) weight split by output columns
ROWS = P(TENSOR)  # a (f, d) or (heads, head_dim, d) weight split by input rows


def _specs(layout: Layout, x: jax.Array) -> _Specs:
    """The specs of the residual stream ``x`` under the sequence-parallel ``layout``, and of
    activations gathered over ``tensor`` from it."""
    assert layout.spec is not None
    batch, seq = (tuple(layout.spec(RESIDUAL, x.shape, "residual stream")) + (None, None))[:2]
    gathered = _entry(tuple(a for a in mesh_axes(seq) if a != TENSOR))
    return _Specs(P(batch, seq, None), P(batch, gathered, TENSOR, None))


def _per_shard(fn: Callable, layout: Layout, in_specs: tuple, out_specs: Any) -> Callable:
    """``fn`` per shard, manual over the whole mesh: a weight, whole but for its tensor split,
    is gathered beforehand over the axes that split it otherwise (fsdp), and its gradient summed
    over the token shards by the transpose, which tracks what varies where (check_vma), so
    nothing is summed over the axes that split nothing. (Manual over the token axes only, the
    bfloat16 gradient does not compile on XLA's CPU backend.)"""
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)


def _gather_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """Every tensor shard's tokens times this device's columns: x (batch, seq/n, d), w (d, f/n)
    -> (batch, seq, f/n), as one ring."""
    b, local, d = x.shape
    n = lax.axis_size(TENSOR)
    y = all_gather_matmul(x.reshape(b * local, d), w, TENSOR)
    # Row block j holds device j's (batch, seq/n) tokens: put them back at their positions.
    return y.reshape(n, b, local, -1).transpose(1, 0, 2, 3).reshape(b, n * local, -1)


def _scatter_rows(x: jax.Array, w: jax.Array) -> jax.Array:
    """This device's tokens of the sum over tensor shards of x @ w: x (batch, seq, k/n), w
    (k/n, d) -> (batch, seq/n, d), as one ring."""
    b, s, k = x.shape
    n = lax.axis_size(TENSOR)
    rows = x.reshape(b, n, s // n, k).transpose(1, 0, 2, 3).reshape(b * s, k)  # grouped by device
    return matmul_reduce_scatter(rows, w, TENSOR).reshape(b, s // n, -1)


def qkv_projection(
    x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, layout: Layout
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v of the sequence-split residual x (batch, seq, d) by (d, heads, head_dim) weights,
    split by heads over ``tensor``: one all-gather matmul of the fused weight's local K/V groups."""

    def local(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array) -> tuple[jax.Array, ...]:
        w = qkv_weight(wq, wk, wv)
        qkv = _gather_rows(x, w.reshape(w.shape[0], -1))
        return split_qkv(qkv.reshape(*qkv.shape[:2], *w.shape[1:]), wq.shape[1])

    sp = _specs(layout, x)
    return _per_shard(local, layout, (sp.tokens, COLUMNS, COLUMNS, COLUMNS), (sp.heads,) * 3)(x, wq, wk, wv)


def out_projection(o: jax.Array, wo: jax.Array, x: jax.Array, layout: Layout) -> jax.Array:
    """o (batch, seq, heads, head_dim) split by heads, times wo (heads, head_dim, d): the sum,
    split by sequence like the residual stream ``x``, as one matmul reduce-scatter."""

    def local(o: jax.Array, wo: jax.Array) -> jax.Array:
        b, s, h, hd = o.shape
        return _scatter_rows(o.reshape(b, s, h * hd), wo.reshape(h * hd, -1))

    sp = _specs(layout, x)
    return _per_shard(local, layout, (sp.heads, ROWS), sp.tokens)(o, wo)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, layout: Layout) -> jax.Array:
    """down(silu(x W_gate) * (x W_up)) of the sequence-split residual x, split alike: gate and up
    as one all-gather matmul, down as one matmul reduce-scatter, the mlp dim split over
    ``tensor``."""

    def local(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
        d, f = w_gate.shape
        gate_up = _gather_rows(x, jnp.stack([w_gate, w_up], axis=1).reshape(d, 2 * f))
        return _scatter_rows(gated(gate_up.reshape(*gate_up.shape[:2], 2, f)), w_down)

    sp = _specs(layout, x)
    return _per_shard(local, layout, (sp.tokens, COLUMNS, COLUMNS, ROWS), sp.tokens)(x, w_gate, w_up, w_down)
