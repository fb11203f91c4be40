"""Building blocks of decoder layers as plain functions of arrays, shared by families.

Rotary embeddings, the fused projections, the embedding lookup and the KV-cache write. The hot
operations (attention, norms, the LM head and its loss) are not here: a model reaches them
through ``kernel_ops``, whose only implementations are the kernels' own.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.paged_attention import pages
from mlsys_jax.models.base import Constrain, no_constraint
from mlsys_jax.models.config import RopeScaling


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """theta^(-2i/d) for i < d/2 (fp32), stretched by ``scaling`` when given (Llama 3's
    wavelength-dependent rule, or a linear division)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    divided = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * divided / scaling.factor + smooth * divided
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, divided)


def rope_angles(
    positions: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * frequency_i for i < d/2: shape positions.shape + (head_dim/2,)
    for positions (seq,) shared by every row or (batch, seq)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of each head's features (the "rotate-half" convention).

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim/2) or (batch, seq, head_dim/2).
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[..., None, :], sin[..., None, :]  # broadcast over heads (and batch when shared)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def qkv_projection(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q = x W_q, k = x W_k, v = x W_v as one matmul over the three weights side by side.

    One matmul means one input gradient: under tensor parallelism the backward pass sums it
    over the shards in a single all-reduce instead of three. Query head i sits in K/V group
    i // (heads / kv_heads), the grouping ``flash_attention`` expects.
    """
    qkv = jnp.einsum("bsd,dkgh->bskgh", x, qkv_weight(wq, wk, wv))
    return split_qkv(qkv, wq.shape[1])


def qkv_weight(wq: jax.Array, wk: jax.Array, wv: jax.Array) -> jax.Array:
    """W_q, W_k, W_v side by side as (d, kv_heads, group + 2, head_dim): each K/V head's group
    of query heads, then its key and its value, so a split over K/V heads keeps groups whole."""
    d, heads, hd = wq.shape
    kv = wk.shape[1]
    return jnp.concatenate([wq.reshape(d, kv, heads // kv, hd), wk[:, :, None], wv[:, :, None]], axis=2)


def split_qkv(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q (batch, seq, heads, head_dim), k and v (batch, seq, kv_heads, head_dim) of the fused
    projection's (batch, seq, kv_heads, group + 2, head_dim)."""
    b, s, _, g2, hd = qkv.shape
    group = g2 - 2
    return qkv[:, :, :, :group].reshape(b, s, heads, hd), qkv[:, :, :, group], qkv[:, :, :, group + 1]


def swiglu(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, constrain: Constrain = no_constraint
) -> jax.Array:
    """down(silu(x W_gate) * (x W_up)); gate and up run as one matmul (one input gradient)."""
    gate_up = jnp.einsum("bsd,dtf->bstf", x, jnp.stack([w_gate, w_up], axis=1))
    hidden = constrain(gated(gate_up), ("batch", "seq", "mlp"))
    return jnp.einsum("bsf,fd->bsd", hidden, w_down)


def gated(gate_up: jax.Array) -> jax.Array:
    """silu(gate) * up of the fused (batch, seq, 2, mlp) gate and up projections."""
    return jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]


@jax.custom_vjp
def embedding_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows of the table for each token.

    The backward pass adds each row's gradients up in fp32, since a frequent token's row sums
    thousands of them, and only then rounds to the table's dtype: the embedding's gradient is
    accumulated (and reduced across devices) in fp32 while the lookup itself reads the
    compute-dtype table.
    """
    return table[tokens]


def _embedding_fwd(table: jax.Array, tokens: jax.Array) -> tuple[jax.Array, tuple]:
    return table[tokens], (tokens, table)  # only the table's shape and dtype are used


def _embedding_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, None]:
    tokens, table = res
    grad = jnp.zeros(table.shape, jnp.float32).at[tokens].add(g.astype(jnp.float32))
    return grad.astype(table.dtype), None


embedding_lookup.defvjp(_embedding_fwd, _embedding_bwd)


def cache_write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """``cache`` (batch, max_len, ...) with row b's positions [start[b], start[b] + seq) replaced
    by ``new`` (batch, seq, ...).

    Written as a gather and a select over the whole cache rather than a scatter: every row keeps
    its place on its own device, however the batch is split.
    """
    max_len, seq = cache.shape[1], new.shape[1]
    index = jnp.arange(max_len)[None, :] - jnp.reshape(start, (-1, 1))  # (batch, max_len)
    inside = (index >= 0) & (index < seq)
    tail = (1,) * (cache.ndim - 2)
    taken = jnp.take_along_axis(new, jnp.clip(index, 0, seq - 1).reshape(*index.shape, *tail), axis=1)
    return jnp.where(inside.reshape(*inside.shape, *tail), taken.astype(cache.dtype), cache)


def paged_write(pool: Any, new: jax.Array, slots: jax.Array) -> Any:
    """``pool`` (num_blocks, block_size, ...) with ``new`` (batch, seq, ...) written at the flat
    slots (batch, seq) ``block * block_size + offset``; nothing is copied when a sequence grows.
    An int8 pool (``Int8Pages``) keeps one scale per block and K/V head (see its module)."""
    return pages.write(pool, new, slots)
