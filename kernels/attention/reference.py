"""Scaled dot-product attention in plain jnp: the specification every attention backend meets,
and the ``xla`` backend (JAX differentiates it).

    o_i = sum_j softmax_j(s_ij) v_j,   s_ij = sm_scale * q_i . k_j   over keys j visible to query i

Shapes follow ``jax.nn.dot_product_attention``: q (batch, seq_q, heads, head_dim), k and v
(batch, seq_k, kv_heads, head_dim) with kv_heads dividing heads; query head h reads K/V head
h // (heads // kv_heads), so grouped- and multi-query attention never repeat K/V.

Positions: key j sits at position j; query i of row b at ``q_offset[b] + i`` (0 + i without
offsets), so a chunk of queries that continues a sequence, or one decoded token, is masked
where it really is. Keys at positions ``>= kv_lengths[b]`` are hidden (a cache's unwritten
tail). A query with no visible key returns zeros, and its log-sum-exp is +inf (so exp(s - lse)
is 0 in any backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention.options import AttentionOptions
from mlsys_jax.kernels.dispatch import Backend


def visible(
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    causal: bool,
    window: int | None,
    q_seg: jax.Array | None = None,
    kv_seg: jax.Array | None = None,
    kv_len: jax.Array | None = None,
) -> jax.Array:
    """Whether key position ``k_pos`` is visible to query position ``q_pos`` (broadcasting).

    Causal: k <= q. Sliding window w: q - k < w (and k - q < w when not causal). Segment ids:
    the two positions belong to the same document. ``kv_len``: k < kv_len. Kernels call this
    on their tiles.
    """
    ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    if causal:
        ok &= k_pos <= q_pos
    if window is not None:
        ok &= q_pos - k_pos < window
        if not causal:
            ok &= k_pos - q_pos < window
    if q_seg is not None:
        ok &= q_seg == kv_seg
    if kv_len is not None:
        ok &= k_pos < kv_len
    return ok


def attention_reference_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    q_offset: jax.Array | None,
    kv_lengths: jax.Array | None,
    opts: AttentionOptions,
) -> tuple[jax.Array, jax.Array]:
    """Output (batch, seq_q, heads, head_dim) in q's dtype and log-sum-exp (batch, heads, seq_q) fp32.

    ``q_offset`` and ``kv_lengths`` are (batch,) ints or None.
    """
    b, s, h, d = q.shape
    t, kv = k.shape[1], k.shape[2]
    qg = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * opts.sm_scale
    # Positions broadcast against scores (b, kv, group, s, t); without offsets or lengths the
    # mask is one (s, t) pattern shared by every row.
    q_pos = jnp.arange(s)[:, None]
    if q_offset is not None:
        q_pos = q_offset[:, None, None, None, None] + q_pos
    kv_len = None if kv_lengths is None else kv_lengths[:, None, None, None, None]
    qs = None if q_seg is None else q_seg[:, None, None, :, None]
    ks = None if kv_seg is None else kv_seg[:, None, None, None, :]
    mask = visible(
        q_pos, jnp.arange(t)[None, :], causal=opts.causal, window=opts.window, q_seg=qs, kv_seg=ks, kv_len=kv_len
    )
    mask = jnp.broadcast_to(mask, scores.shape)
    # Hidden scores take the lowest finite float, so exp(s - max) is 0 for them while a row with
    # nothing visible stays finite (its probabilities are then zeroed, its lse set to +inf).
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    p = jnp.exp(scores - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    seen = jnp.any(mask, axis=-1, keepdims=True)
    probs = jnp.where(seen, p / l, 0.0)
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = jnp.where(seen, m + jnp.log(l), jnp.inf)[..., 0]
    return out.reshape(b, s, h, d).astype(q.dtype), lse.reshape(b, h, s)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    q_offset: jax.Array | None,
    kv_lengths: jax.Array | None,
    opts: AttentionOptions,
) -> jax.Array:
    """The reference output alone, differentiated by JAX's autodiff."""
    return attention_reference_with_lse(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts)[0]


BACKEND = Backend("xla", ("cpu", "gpu", "tpu"), attention_reference)
