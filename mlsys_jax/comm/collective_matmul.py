"""Collective matmuls for tensor parallelism, for use inside ``jax.shard_map`` over one axis.

Each function replaces a collective followed (or preceded) by a matmul with a ring of n
steps: every step multiplies one block while ``lax.ppermute`` moves another block to the
right neighbour, so on hardware that overlaps communication with compute each send hides
behind a matmul. The Python loops are unrolled over the static axis size, so the compiled
program holds exactly n-1 collective-permutes and no all-gather or reduce-scatter; an axis of
size 1 is a plain matmul. Both are differentiable (a ppermute transposes to the reverse
ppermute). Floating inputs narrower than float32 are multiplied with float32 accumulation and
the result is cast back to the inputs' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _shift(x: jax.Array, axis_name: str, n: int) -> jax.Array:
    """Send ``x`` from device i to device (i + 1) mod n along ``axis_name``."""
    return lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)])


def _check(x: jax.Array, w: jax.Array, fn: str) -> None:
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"{fn} takes 2-D x and w; got x {x.shape} and w {w.shape}. Fix: flatten leading dims of x.")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"{fn}: x {x.shape} and w {w.shape} do not multiply (inner sizes differ)")


def _dtypes(x: jax.Array, w: jax.Array) -> tuple[jnp.dtype, jnp.dtype]:
    """(result dtype, accumulation dtype): float32 accumulation for narrower floats."""
    out = jnp.result_type(x, w)
    acc = jnp.promote_types(out, jnp.float32) if jnp.issubdtype(out, jnp.floating) else out
    return out, acc


def _dot(a: jax.Array, b: jax.Array, acc: jnp.dtype) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=acc)


def all_gather_matmul(x: jax.Array, w: jax.Array, axis_name: str) -> jax.Array:
    """``all_gather(x, axis_name, tiled=True) @ w`` on each device, as a ring.

    ``x`` is this device's row block (m/n, k) of the row-sharded activations, ``w`` its
    column shard (k, f/n) of the weight; returns (m, f/n). Step s multiplies the row block that
    started on device (i - s) mod n into rows of that block of the output while the block
    moves on to the right neighbour (n-1 sends of an (m/n, k) block in all).
    """
    _check(x, w, "all_gather_matmul")
    out_dtype, acc = _dtypes(x, w)
    n = lax.axis_size(axis_name)
    if n == 1:
        return _dot(x, w, acc).astype(out_dtype)
    i = lax.axis_index(axis_name)
    rows = x.shape[0]
    out = jnp.zeros((n * rows, w.shape[1]), out_dtype)
    chunk = x
    for step in range(n):
        # The send of ``chunk`` and its matmul share no data dependence: they can overlap.
        received = _shift(chunk, axis_name, n) if step < n - 1 else chunk
        block = _dot(chunk, w, acc).astype(out_dtype)
        out = lax.dynamic_update_slice_in_dim(out, block, ((i - step) % n) * rows, 0)
        chunk = received
    return out


def matmul_reduce_scatter(x: jax.Array, w: jax.Array, axis_name: str) -> jax.Array:
    """``psum_scatter(x @ w, axis_name, scatter_dimension=0, tiled=True)`` on each device, as a ring.

    ``x`` is this device's feature shard (m, k/n) of the activations, ``w`` its row shard
    (k/n, f) of the weight; returns row block i (m/n, f) of the sum over devices of ``x @ w``
    on device i. Device i starts the partial sum of row block (i - 1) mod n; at each of the n-1
    steps it passes its partial sum to the right neighbour and adds its own product for the
    row block it receives, (i - 2 - step) mod n, so the last block it adds is its own. Partial
    sums travel in the accumulation dtype (float32 for narrower floats).
    """
    _check(x, w, "matmul_reduce_scatter")
    out_dtype, acc = _dtypes(x, w)
    n = lax.axis_size(axis_name)
    if n == 1:
        return _dot(x, w, acc).astype(out_dtype)
    if x.shape[0] % n:
        raise ValueError(
            f"matmul_reduce_scatter: x has {x.shape[0]} rows, not a multiple of the {n} devices on {axis_name!r}"
        )
    i = lax.axis_index(axis_name)
    rows = x.shape[0] // n

    def product(block: jax.Array) -> jax.Array:
        return _dot(lax.dynamic_slice_in_dim(x, block * rows, rows, 0), w, acc)

    partial = product((i - 1) % n)
    for step in range(n - 1):
        partial = _shift(partial, axis_name, n) + product((i - 2 - step) % n)
    return partial.astype(out_dtype)
