"""Paged attention in plain jnp: the specification every paged-attention backend meets, and the
``xla`` backend (JAX differentiates it).

Each row's keys and values live in fixed-size blocks of a shared pool, found through its block
table. The reference gathers them back into contiguous (batch, max_blocks * block_size, kv_heads,
head_dim) arrays and runs the flash-attention reference on those, so masking, grouped heads and
the fp32 softmax are the ones ``flash_attention`` specifies: causal from each row's ``q_offset``,
keys at positions ``>= lengths[b]`` hidden, a query that sees no key gets zeros. Pools of int8
come with ``k_scales``/``v_scales`` (num_blocks, kv_heads): each gathered block is widened to q's
dtype as ``values * scale[block, head]`` before attending.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention.options import AttentionOptions
from mlsys_jax.kernels.attention.reference import attention_reference
from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.paged_attention.pages import dequantize_blocks


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Row b's logical blocks, in order: (num_blocks, block_size, ...) -> (batch, max_blocks * block_size, ...).

    Table entries are clipped into the pool, so an unused entry holding anything (0, -1, junk)
    reads some block whose keys the lengths then hide, never NaN fill.
    """
    rows = jnp.take(pages, block_tables, axis=0, mode="clip")  # (batch, max_blocks, block_size, ...)
    b, n, size = rows.shape[:3]
    return rows.reshape(b, n * size, *rows.shape[3:])


def gather_dequantized(
    pages: jax.Array, scales: jax.Array | None, block_tables: jax.Array, dtype: jnp.dtype
) -> jax.Array:
    """``gather_pages`` of a pool in ``dtype``, int8 blocks widened by their (block, head) scale."""
    if scales is None:
        return gather_pages(pages, block_tables)
    rows = jnp.take(pages, block_tables, axis=0, mode="clip")  # (batch, max_blocks, block_size, ...)
    wide = dequantize_blocks(rows, jnp.take(scales, block_tables, axis=0, mode="clip"), dtype)
    b, n, size = wide.shape[:3]
    return wide.reshape(b, n * size, *wide.shape[3:])


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    q_offset: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """Causal attention of q (batch, q_len, heads, head_dim) over each row's paged keys, in q's dtype.

    ``lengths`` and ``q_offset`` are (batch,) int32: how many keys row b has, and the position of
    its first query; ``k_scales``/``v_scales`` (num_blocks, kv_heads) come with int8 pools.
    """
    k = gather_dequantized(k_pages, k_scales, block_tables, q.dtype)
    v = gather_dequantized(v_pages, v_scales, block_tables, q.dtype)
    opts = AttentionOptions(causal=True, sm_scale=sm_scale, window=window)
    return attention_reference(q, k, v, None, None, q_offset, lengths, opts)


def with_reference_gradient(forward: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """A Pallas forward ``forward(q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales,
    v_scales, sm_scale, window, interpret)`` made differentiable by the reference's vjp: w.r.t. q
    and float pools, or q and the scales of int8 pools (int8 values get no cotangent). Kernels
    serve decoding; a training-time call is exact, only slow."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
    def attend(q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales, sm_scale, window, interpret):
        return forward(
            q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales, sm_scale, window, interpret
        )

    def attend_fwd(*args: Any) -> tuple[jax.Array, tuple]:
        return forward(*args), args[:8]

    def attend_bwd(sm_scale, window, interpret, res, do):
        del interpret
        q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales = res
        rest = (block_tables, lengths, q_offset)
        if k_scales is None:

            def spec(q, k_pages, v_pages):
                return paged_attention_reference(q, k_pages, v_pages, *rest, sm_scale=sm_scale, window=window)

            dq, dk, dv = jax.vjp(spec, q, k_pages, v_pages)[1](do)
            return dq, dk, dv, None, None, None, None, None

        def spec_int8(q, k_scales, v_scales):
            return paged_attention_reference(
                q, k_pages, v_pages, *rest, sm_scale=sm_scale, window=window, k_scales=k_scales, v_scales=v_scales
            )

        dq, dks, dvs = jax.vjp(spec_int8, q, k_scales, v_scales)[1](do)
        return dq, None, None, None, None, None, dks, dvs

    attend.defvjp(attend_fwd, attend_bwd)
    return cast(Callable[..., jax.Array], attend)


BACKEND = Backend("xla", ("cpu", "gpu", "tpu"), paged_attention_reference)
