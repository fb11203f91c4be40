"""Argument checks shared by the attention operations (contiguous and paged): one message per
mistake, naming the operation, what was given and what fits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention.options import FLOAT_DTYPES


def check_heads(
    where: str,
    q: jax.Array,
    k: jax.Array | jax.ShapeDtypeStruct,
    v: jax.Array | jax.ShapeDtypeStruct,
    names: tuple[str, str, str],
) -> None:
    """q, k and v agree on head_dim and dtype, and K/V heads divide query heads (dim 2)."""
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: {names[0]} {q.shape} and {names[1]} {k.shape} must agree on head_dim (dim 3)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"{where}: kv_heads={k.shape[2]} must divide heads={q.shape[2]} (each K/V head "
            "serves a whole group of query heads). Fix: pick kv_heads from the divisors of heads."
        )
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{where}: {', '.join(names)} must share one dtype among float32, bfloat16, float16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )


def check_window(where: str, sliding_window: int | None) -> None:
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"{where}: sliding_window must be a positive int or None, got {sliding_window!r}")


def per_row(where: str, name: str, x: jax.Array | int, batch: int) -> jax.Array:
    """One int32 per batch row: a Python int is broadcast, an array must be (batch,) of ints."""
    if isinstance(x, int):
        return jnp.full((batch,), x, jnp.int32)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.shape != (batch,):
        raise ValueError(
            f"{where}: {name} must be an int or one int per batch row, shape ({batch},); "
            f"got {x.dtype} of shape {x.shape}"
        )
    return x.astype(jnp.int32)
