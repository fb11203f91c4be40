"""The building blocks of a Llama-family decoder as plain functions of arrays.

Every function takes the activations' ``constrain(x, logical_axes)`` hook so a plan can place
intermediate results; the functions themselves know nothing about devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


def no_constraint(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    del logical_axes
    return x


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * theta^(-2i/d) for i < d/2; shape (seq, head_dim/2)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of each head's features (the "rotate-half" convention).

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim/2).
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def qkv_projection(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q = x W_q, k = x W_k, v = x W_v as one matmul over the three weights side by side.

    One matmul means one input gradient: under tensor parallelism the backward pass sums it
    over the shards in a single all-reduce instead of three. Query head i sits in K/V group
    i // (heads / kv_heads), the grouping ``attention_xla`` expects.
    """
    d, heads, hd = wq.shape
    kv = wk.shape[1]
    group = heads // kv
    w = jnp.concatenate([wq.reshape(d, kv, group, hd), wk[:, :, None], wv[:, :, None]], axis=2)
    qkv = jnp.einsum("bsd,dkgh->bskgh", x, w)
    b, s = x.shape[:2]
    return qkv[:, :, :, :group].reshape(b, s, heads, hd), qkv[:, :, :, group], qkv[:, :, :, group + 1]


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           constrain: Constrain = no_constraint) -> jax.Array:
    """down(silu(x W_gate) * (x W_up)); gate and up run as one matmul (one input gradient)."""
    gate_up = jnp.einsum("bsd,dtf->bstf", x, jnp.stack([w_gate, w_up], axis=1))
    hidden = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", "seq", "mlp"))
    return jnp.einsum("bsf,fd->bsd", hidden, w_down)


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


@jax.custom_vjp
def logits_projection(x: jax.Array, w: jax.Array) -> jax.Array:
    """logits = x W in fp32 (softmax over a large vocabulary wants the precision), while the
    backward pass works in x's dtype like every other matmul, so W's gradient is reduced
    across devices in the compute dtype."""
    return jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.float32)


def _logits_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return logits_projection(x, w), (x, w)


def _logits_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    g = g.astype(x.dtype)
    return jnp.einsum("bsv,dv->bsd", g, w), jnp.einsum("bsd,bsv->dv", x, g)


logits_projection.defvjp(_logits_fwd, _logits_bwd)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v with grouped-query heads, K/V never repeated.

    q: (batch, seq, heads, d); k, v: (batch, seq_kv, kv_heads, d), kv_heads dividing heads.
    Scores and softmax run in fp32.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, s, kv, h // kv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    if causal:
        t = k.shape[1]
        mask = jnp.arange(s)[:, None] + (t - s) >= jnp.arange(t)[None, :]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)


def attention_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True) -> jax.Array:
    """The same attention through cuDNN's fused kernel (GPU only)."""
    platform = jax.devices()[0].platform
    if platform != "gpu":
        raise ValueError(
            f"attention='cudnn' runs only on NVIDIA GPUs, but JAX's devices are {platform!r}. "
            "Fix: use attention='xla' on this machine."
        )
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


ATTENTION = {"xla": attention_xla, "cudnn": attention_cudnn}
