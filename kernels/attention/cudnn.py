"""cuDNN's fused attention through ``jax.nn.dot_product_attention``: backend ``cudnn`` (GPU).

It serves bf16/fp16 with head_dim a multiple of 8 up to 128, causal and sliding-window masks and
key-value lengths; it cannot place queries at an offset or take segment ids, so dispatch passes
it over for those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention.options import AttentionOptions
from mlsys_jax.kernels.dispatch import Backend


def check(*, dtype, head_dim, segments, offsets=False, **_) -> str | None:
    """Why cuDNN cannot serve these arguments, or None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN's fused attention takes bf16 or fp16, not {jnp.dtype(dtype).name}"
    if head_dim > 128 or head_dim % 8:
        return f"cuDNN needs head_dim a multiple of 8 up to 128, got {head_dim}"
    if segments:
        return "JAX's cuDNN binding takes no segment ids"
    if offsets:
        return "JAX's cuDNN binding aligns queries at position 0 and takes no query offsets"
    return None


def run(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts: AttentionOptions):
    del q_seg, kv_seg, q_offset
    window = None
    if opts.window is not None:
        window = (opts.window - 1, 0 if opts.causal else opts.window - 1)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=opts.sm_scale,
        is_causal=opts.causal,
        key_value_seq_lengths=kv_lengths,
        local_window_size=window,
        implementation="cudnn",
    )


BACKEND = Backend("cudnn", ("gpu",), run, check)
