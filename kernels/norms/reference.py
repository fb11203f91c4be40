"""RMSNorm and LayerNorm in plain jnp: the specification of every norm backend, and the ``xla``
backends (JAX differentiates them). Both normalize over the last axis in fp32 and return x's
dtype; any leading shape is kept as it is, so XLA partitions them like any elementwise op."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.dispatch import Backend


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm_reference(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """(x - mean) * rsqrt(var + eps) * weight + bias over the last axis, in fp32, in x's dtype."""
    x32 = x.astype(jnp.float32)
    xc = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _rms(x, weight, bias, *, eps, blocks):
    del bias, blocks
    return rms_norm_reference(x, weight, eps)


def _layer(x, weight, bias, *, eps, blocks):
    del blocks
    return layer_norm_reference(x, weight, bias, eps)


RMS_BACKEND = Backend("xla", ("cpu", "gpu", "tpu"), _rms)
LAYER_BACKEND = Backend("xla", ("cpu", "gpu", "tpu"), _layer)
