"""``flash_attention``: one interface over the attention backends, with checks and dispatch.

The family's layout: ``reference`` (the specification, and the ``xla`` backend), one module per
other backend (``cudnn``, ``triton``, ``tpu``; each Pallas one with its block defaults and tuning
candidates beside its kernels), ``options`` (block config and static options) and ``vjp`` (how
a pair of Pallas kernels becomes a differentiable backend). ``FLASH_ATTENTION`` is the explicit
table of backends and each platform's order of preference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention import cudnn, reference, tpu, triton
from mlsys_jax.kernels.attention.checks import check_heads, check_window, per_row
from mlsys_jax.kernels.attention.options import AttentionBlocks, AttentionOptions
from mlsys_jax.kernels.attention.reference import (
    attention_reference,
    attention_reference_with_lse,
    visible,
)
from mlsys_jax.kernels.attention.vjp import pallas_vjp
from mlsys_jax.kernels.autotune import resolve_blocks
from mlsys_jax.kernels.dispatch import Registry

__all__ = [
    "FLASH_ATTENTION",
    "AttentionBlocks",
    "AttentionOptions",
    "attention_reference",
    "attention_reference_with_lse",
    "choose",
    "flash_attention",
    "pallas_vjp",
    "visible",
]

FLASH_ATTENTION = Registry(
    "flash_attention",
    order={"gpu": ("cudnn", "pallas_triton", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)},
    backends=(reference.BACKEND, cudnn.BACKEND, triton.BACKEND, tpu.BACKEND),
)


def _check_inputs(q, k, v, segment_ids, sliding_window, q_offset, kv_lengths):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"flash_attention: {name} must be (batch, seq, heads, head_dim), got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} must agree on batch (dim 0)")
    check_heads("flash_attention", q, k, v, ("q", "k", "v"))
    check_window("flash_attention", sliding_window)
    positions = tuple(_per_row(name, x, q.shape[0]) for name, x in (("q_offset", q_offset), ("kv_lengths", kv_lengths)))
    if segment_ids is None:
        return (None, None) + positions
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                "flash_attention: one segment_ids array needs seq_q == seq_k; for cross-attention "
                "pass (q_segment_ids, kv_segment_ids)"
            )
        q_seg = kv_seg = segment_ids
    for name, seg, x in (("query", q_seg, q), ("key", kv_seg, k)):
        if seg.shape != x.shape[:2]:
            raise ValueError(
                f"flash_attention: {name} segment ids must be (batch, seq) = {x.shape[:2]}, got {seg.shape}"
            )
    return (q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)) + positions


def _per_row(name: str, x, batch: int) -> jax.Array | None:
    return None if x is None else per_row("flash_attention", name, x, batch)


def choose(
    q,
    k,
    *,
    causal: bool = False,
    segment_ids=None,
    sliding_window: int | None = None,
    q_offset=None,
    kv_lengths=None,
    implementation: str | None = None,
):
    """The backend ``flash_attention`` would run for these arguments (see ``Choice.describe``)."""
    return FLASH_ATTENTION.choose(
        implementation,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        seq_q=q.shape[1],
        seq_k=k.shape[1],
        heads=q.shape[2],
        kv_heads=k.shape[2],
        causal=causal,
        segments=segment_ids is not None,
        window=sliding_window,
        offsets=q_offset is not None,
        lengths=kv_lengths is not None,
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    q_offset: jax.Array | int | None = None,
    kv_lengths: jax.Array | int | None = None,
    implementation: str | None = None,
    blocks: AttentionBlocks | None = None,
) -> jax.Array:
    """softmax(sm_scale q k^T + mask) v without materializing the scores.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim). ``causal``
    hides keys after the query; ``sliding_window=w`` hides keys w or more positions away;
    ``segment_ids`` (batch, seq), or a (query, key) pair, hides keys of other documents.
    ``q_offset`` (batch,) places query i of row b at position q_offset[b] + i (keys are at
    0..seq_k-1), so a prefill chunk or a decoded token attending to a cache is masked where it
    really is; ``kv_lengths`` (batch,) hides keys at positions >= kv_lengths[b]. A query that
    sees no key gets zeros. ``implementation``: None picks the best backend here, "pallas" the
    best Pallas one, or a backend's name ("xla", "cudnn", "pallas_triton", "pallas_tpu").
    """
    q_seg, kv_seg, q_off, kv_len = _check_inputs(q, k, v, segment_ids, sliding_window, q_offset, kv_lengths)
    choice = choose(
        q,
        k,
        causal=causal,
        segment_ids=segment_ids,
        sliding_window=sliding_window,
        q_offset=q_offset,
        kv_lengths=kv_lengths,
        implementation=implementation,
    )
    if blocks is None:
        blocks = resolve_blocks("flash_attention", choice.backend, q, k)
    opts = AttentionOptions(
        causal=causal,
        sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
        window=sliding_window,
        blocks=blocks or AttentionBlocks(),
    )
    return choice(q, k, v, q_seg, kv_seg, q_off, kv_len, opts)
