"""``flash_attention``: one interface over the attention backends, with checks and dispatch.

Backends register in ``REGISTRY``. A Pallas backend supplies a forward that returns the output
and the log-sum-exp, and a backward that recomputes scores from them; ``pallas_vjp`` wires the
pair into a ``custom_vjp``. The ``xla`` backend is the reference of ``attention_reference``,
differentiated by JAX; ``cudnn`` is JAX's binding of cuDNN's fused kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention_reference import (
    AttentionOptions,
    attention_reference,
    attention_reference_with_lse,
)
from mlsys_jax.kernels.autotune import resolve_blocks
from mlsys_jax.kernels.configs import AttentionBlocks
from mlsys_jax.kernels.dispatch import Backend, Registry

__all__ = ["flash_attention", "REGISTRY", "AttentionOptions", "pallas_vjp", "attention_reference",
           "attention_reference_with_lse", "choose"]

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

REGISTRY = Registry("flash_attention", {
    "gpu": ("cudnn", "pallas_mosaic_gpu", "pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
})

Forward = Callable[..., tuple[jax.Array, jax.Array]]
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def pallas_vjp(forward: Forward, backward: Backward) -> Callable[..., jax.Array]:
    """A differentiable attention from ``forward(q, k, v, q_seg, kv_seg, opts) -> (o, lse)`` and
    ``backward(q, k, v, q_seg, kv_seg, o, lse, do, opts) -> (dq, dk, dv)``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def attend(q, k, v, q_seg, kv_seg, opts):
        return forward(q, k, v, q_seg, kv_seg, opts)[0]

    def attend_fwd(q, k, v, q_seg, kv_seg, opts):
        o, lse = forward(q, k, v, q_seg, kv_seg, opts)
        return o, (q, k, v, q_seg, kv_seg, o, lse)

    def attend_bwd(opts, res, do):
        q, k, v, q_seg, kv_seg, o, lse = res
        dq, dk, dv = backward(q, k, v, q_seg, kv_seg, o, lse, do, opts)
        return dq, dk, dv, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def _run_pallas(attend: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    def run(q, k, v, q_seg, kv_seg, opts, *, interpret: bool = False):
        return attend(q, k, v, q_seg, kv_seg, dataclasses.replace(opts, interpret=interpret))
    return run


def register_pallas(name: str, platforms: tuple[str, ...], forward: Forward, backward: Backward,
                    check: Callable[..., str | None]) -> Backend:
    """Add a Pallas backend built from its forward and backward kernels."""
    return REGISTRY.register(Backend(name, platforms, _run_pallas(pallas_vjp(forward, backward)),
                                     check, interpretable=True))


# --- the reference and cuDNN --------------------------------------------------------------------

REGISTRY.register(Backend("xla", ("cpu", "gpu", "tpu"), attention_reference))


def _cudnn_check(*, dtype, head_dim, segments, window, causal, **_) -> str | None:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN's fused attention takes bf16 or fp16, not {jnp.dtype(dtype).name}"
    if head_dim > 128 or head_dim % 8:
        return f"cuDNN needs head_dim a multiple of 8 up to 128, got {head_dim}"
    if segments:
        return "JAX's cuDNN binding takes no segment ids"
    return None


def _cudnn_run(q, k, v, q_seg, kv_seg, opts: AttentionOptions):
    del q_seg, kv_seg
    window = None
    if opts.window is not None:
        window = (opts.window - 1, 0 if opts.causal else opts.window - 1)
    return jax.nn.dot_product_attention(q, k, v, scale=opts.sm_scale, is_causal=opts.causal,
                                        local_window_size=window, implementation="cudnn")


REGISTRY.register(Backend("cudnn", ("gpu",), _cudnn_run, _cudnn_check))


# --- the public function ------------------------------------------------------------------------

def _check_inputs(q, k, v, segment_ids, sliding_window) -> tuple[jax.Array | None, jax.Array | None]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"flash_attention: {name} must be (batch, seq, heads, head_dim), got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"flash_attention: q {q.shape} and k {k.shape} must agree on batch (dim 0) and head_dim (dim 3)"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"flash_attention: kv_heads={k.shape[2]} must divide heads={q.shape[2]} (each K/V head "
            "serves a whole group of query heads). Fix: pick kv_heads from the divisors of heads."
        )
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"flash_attention: q, k, v must share one dtype among float32, bfloat16, float16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window must be a positive int or None, got {sliding_window!r}")
    if segment_ids is None:
        return None, None
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
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def choose(q, k, *, causal: bool = False, segment_ids=None, sliding_window: int | None = None,
           implementation: str | None = None):
    """The backend ``flash_attention`` would run for these arguments (see ``Choice.describe``)."""
    return REGISTRY.choose(
        implementation, dtype=q.dtype, head_dim=q.shape[-1], seq_q=q.shape[1], seq_k=k.shape[1],
        heads=q.shape[2], kv_heads=k.shape[2], causal=causal, segments=segment_ids is not None,
        window=sliding_window,
    )


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    sm_scale: float | None = None, sliding_window: int | None = None,
                    implementation: str | None = None, blocks: AttentionBlocks | None = None
                    ) -> jax.Array:
    """softmax(sm_scale q k^T + mask) v without materializing the scores.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim). ``causal``
    hides keys after the query; ``sliding_window=w`` hides keys w or more positions away;
    ``segment_ids`` (batch, seq), or a (query, key) pair, hides keys of other documents. A query
    that sees no key gets zeros. ``implementation``: None picks the best backend here, "pallas"
    the best Pallas one, or a backend's name ("xla", "cudnn", "pallas_triton", "pallas_tpu").
    """
    q_seg, kv_seg = _check_inputs(q, k, v, segment_ids, sliding_window)
    choice = choose(q, k, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window,
                    implementation=implementation)
    if blocks is None:
        blocks = resolve_blocks("flash_attention", choice.backend.name, AttentionBlocks, q, k)
    opts = AttentionOptions(causal=causal, sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
                            window=sliding_window, blocks=blocks)
    return choice(q, k, v, q_seg, kv_seg, opts)
