"""Run each kernel per shard under ``shard_map``, so a Pallas call composes with any placement.

XLA cannot partition a Pallas call: left alone it would gather every input onto each device. Here
each kernel runs on the shard it owns along the axes it is independent in (batch and heads for
attention, rows for norms, tokens for the loss) and the wrappers add no collective of their own,
except where the math needs one: the loss over a vocabulary split across devices combines its
log-sum-exp across those devices. Specs say where the inputs already live; a dimension the kernel
needs whole (the sequence for attention, features for norms) is left unsplit in ``in_specs``,
which makes XLA gather it beforehand exactly as the unfused path would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mlsys_jax.kernels.attention import flash_attention
from mlsys_jax.kernels.paged_attention import Int8Pages, paged_attention


def mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes one PartitionSpec entry names (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _size(mesh: Any, axes: tuple[str, ...]) -> int:
    out = 1
    for a in axes:
        out *= mesh.shape[a]
    return out


def _padded(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _shard_map(fn: Callable, mesh: Any, in_specs: tuple, out_specs: Any, check_vma: bool = False) -> Callable:
    # By default replication is not tracked (check_vma=False): Pallas calls carry no
    # varying-axis types, and shard_map's transpose then sums cotangents of replicated inputs.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def _kv_for_local_heads(
    k: jax.Array, v: jax.Array, heads: int, kv_heads: int, head_axes: tuple[str, ...], shards: int
) -> tuple[jax.Array, jax.Array]:
    """This shard's K/V heads when query heads are split over ``head_axes`` but K/V are whole.

    Query head h reads K/V head h // group; a shard holding query heads [i*hl, (i+1)*hl) needs
    only the K/V heads of those groups, sliced here without any communication.
    """
    group, local = heads // kv_heads, heads // shards
    index = jax.lax.axis_index(head_axes)
    if local % group == 0:
        n = local // group
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, index * n, n, axis=2)
    elif group % local == 0:
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, (index * local) // group, 1, axis=2)
    else:  # groups straddle shards: give each local query head its own K/V head
        idx = (index * local + jnp.arange(local)) // group
        take = lambda x: jnp.take(x, idx, axis=2)
    return take(k), take(v)


def sharded_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Any,
    q_spec: P,
    kv_spec: P,
    segment_ids: jax.Array | None = None,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    **kwargs: Any,
) -> jax.Array:
    """``flash_attention`` per (batch, heads) shard. ``q_spec``/``kv_spec`` place (batch, seq,
    heads, head_dim); the sequence and head_dim are kept whole inside. K/V heads that are not
    split like the query heads are sliced locally to the groups each shard needs. Segment ids
    (batch, seq), query offsets and key-value lengths (batch,) follow the batch split."""
    qb, _, qh, _ = _padded(q_spec, 4)
    kh = _padded(kv_spec, 4)[2]
    batch, q_heads, kv_heads = mesh_axes(qb), mesh_axes(qh), mesh_axes(kh)
    if kv_heads and kv_heads != q_heads:
        kv_heads = ()  # an unusual split: take K/V heads whole and slice locally
    shards = _size(mesh, q_heads)
    slice_kv = bool(q_heads) and not kv_heads
    if kv_heads and k.shape[2] % _size(mesh, kv_heads):
        raise ValueError(f"kv_heads={k.shape[2]} does not split over mesh axes {kv_heads}")

    q_in = P(_entry(batch), None, _entry(q_heads), None)
    kv_in = P(_entry(batch), None, _entry(kv_heads), None)
    extras = {
        name: (x, P(_entry(batch), None) if name == "segment_ids" else P(_entry(batch)))
        for name, x in (("segment_ids", segment_ids), ("q_offset", q_offset), ("kv_lengths", kv_lengths))
        if x is not None
    }

    def local(q, k, v, *rest):
        if slice_kv:
            k, v = _kv_for_local_heads(k, v, q.shape[2] * shards, k.shape[2], q_heads, shards)
        return flash_attention(q, k, v, **dict(zip(extras, rest)), **kwargs)

    args = (q, k, v) + tuple(x for x, _ in extras.values())
    specs = (q_in, kv_in, kv_in) + tuple(spec for _, spec in extras.values())
    return _shard_map(local, mesh, specs, q_in)(*args)


def sharded_paged_attention(
    q: jax.Array,
    k_pages: jax.Array | Int8Pages,
    v_pages: jax.Array | Int8Pages,
    block_tables: jax.Array,
    lengths: jax.Array,
    q_offset: jax.Array,
    *,
    mesh: Any,
    q_spec: P,
    pages_spec: P,
    **kwargs: Any,
) -> jax.Array:
    """``paged_attention`` per (batch, heads) shard. ``q_spec`` places (batch, seq, heads,
    head_dim) and ``pages_spec`` a pool (num_blocks, block_size, kv_heads, head_dim): each shard
    attends with its query heads over its own K/V heads' pages (an int8 pool's scales split with
    them), or over all of them when the pools are not split like the heads. Block tables, lengths
    and offsets follow the batch split."""
    qb, _, qh, _ = _padded(q_spec, 4)
    batch, q_heads = mesh_axes(qb), mesh_axes(qh)
    kv_heads = mesh_axes(_padded(pages_spec, 4)[2])
    if kv_heads != q_heads:
        kv_heads = ()  # pools whole on every shard: each shard slices the K/V heads its queries read
    shards = _size(mesh, q_heads)
    slice_kv = bool(q_heads) and not kv_heads
    pool = P(None, None, _entry(kv_heads), None)
    pool_in: Any = Int8Pages(pool, P(None, _entry(kv_heads))) if isinstance(k_pages, Int8Pages) else pool  # pyright: ignore[reportArgumentType]
    q_in, row = P(_entry(batch), None, _entry(q_heads), None), P(_entry(batch))

    def local(q, k, v, tables, lengths, offset):
        if slice_kv:
            total = k.shape[2] if not isinstance(k, Int8Pages) else k.values.shape[2]
            k, v = _pages_for_local_heads(k, v, q.shape[2] * shards, total, q_heads, shards)
        return paged_attention(q, k, v, tables, lengths, q_offset=offset, **kwargs)

    specs = (q_in, pool_in, pool_in, P(_entry(batch), None), row, row)
    return _shard_map(local, mesh, specs, q_in)(q, k_pages, v_pages, block_tables, lengths, q_offset)


def _pages_for_local_heads(k: Any, v: Any, heads: int, kv_heads: int, head_axes: tuple[str, ...], shards: int) -> Any:
    """This shard's K/V heads of whole pools; an int8 pool's (num_blocks, kv_heads) scales are
    sliced alike (viewed with their heads on axis 2)."""
    if not isinstance(k, Int8Pages):
        return _kv_for_local_heads(k, v, heads, kv_heads, head_axes, shards)
    kq, vq = _kv_for_local_heads(k.values, v.values, heads, kv_heads, head_axes, shards)
    ks, vs = _kv_for_local_heads(
        k.scale[:, None, :, None], v.scale[:, None, :, None], heads, kv_heads, head_axes, shards
    )
    return Int8Pages(kq, ks[:, 0, :, 0]), Int8Pages(vq, vs[:, 0, :, 0])


def sharded_rows(fn: Callable[..., jax.Array], x: jax.Array, *params: jax.Array, mesh: Any, x_spec: P) -> jax.Array:
    """``fn(x, *params)`` per shard of x's leading (row) dims; the feature dim and the
    parameters are whole on every shard (norms: each row normalizes on its own)."""
    lead = _padded(x_spec, x.ndim)[:-1]
    x_in = P(*lead, None)
    return _shard_map(fn, mesh, (x_in,) + (P(),) * len(params), x_in)(x, *params)


def sharded_token_loss(
    fn: Callable[..., jax.Array],
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    mesh: Any,
    token_spec: P,
    vocab_axes: tuple[str, ...],
) -> jax.Array:
    """Per-token loss ``fn(hidden, weight, labels, vocab_axis=...)`` per shard of the tokens, with
    the weight's vocabulary split over ``vocab_axes`` (tensor parallelism) and whole features."""
    lead = _padded(token_spec, labels.ndim)
    taken = {a for e in lead for a in mesh_axes(e)}
    vocab_axes = tuple(a for a in vocab_axes if a not in taken)
    if vocab_axes and weight.shape[1] % _size(mesh, vocab_axes):
        raise ValueError(f"vocab={weight.shape[1]} does not split over mesh axes {vocab_axes}")
    h_in = P(*lead, None)
    w_in = P(None, _entry(vocab_axes))
    t_in = P(*lead)

    def local(h, w, y):
        return fn(h, w, y, vocab_axis=_entry(vocab_axes))

    return _shard_map(local, mesh, (h_in, w_in, t_in), t_in)(hidden, weight, labels)
