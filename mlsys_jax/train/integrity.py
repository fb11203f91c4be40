"""On-device checks of a train state: are all its values finite, and a fingerprint of each leaf
that a restored copy must match bit for bit.

A fingerprint is a position-weighted sum of the leaf's bit patterns modulo 2**32. Integer
addition is exact and order-free, so the figure is the same however the leaf is sharded, and a
restore onto another mesh checks against the one taken at save time.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _bits(x: jax.Array) -> jax.Array:
    """The leaf's bit patterns as uint32 words."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = x.dtype.itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if width == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if width == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing dim of two words


def leaf_fingerprint(x: jax.Array) -> jax.Array:
    """sum over elements of bits * (1 + position-dependent weight), modulo 2**32."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = _bits(x)
    weight = jnp.ones(bits.shape, jnp.uint32)
    for dim in range(bits.ndim):
        weight = weight + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(2 * dim + 3)
    return jnp.sum(bits * weight, dtype=jnp.uint32) + jnp.sum(bits, dtype=jnp.uint32)


def _all_finite(tree: Any) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


@functools.partial(jax.jit, static_argnums=())
def _inspect(state: Any) -> tuple[jax.Array, list[jax.Array]]:
    return _all_finite(state), [leaf_fingerprint(x) for x in jax.tree_util.tree_leaves(state)]


def leaf_names(state: Any) -> list[str]:
    """Each leaf's path in the state, in ``tree_leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [jax.tree_util.keystr(path) for path, _ in flat]


def inspect(state: Any) -> tuple[bool, dict[str, int]]:
    """Whether every floating value in ``state`` is finite, and each leaf's fingerprint by path.
    One small device computation; the host waits for its few scalars."""
    finite, prints = jax.device_get(_inspect(state))
    return bool(finite), {name: int(np.uint32(p)) for name, p in zip(leaf_names(state), prints)}


def mismatches(saved: dict[str, int], restored: dict[str, int]) -> list[str]:
    """The leaves whose restored fingerprint differs from (or is missing against) the saved one."""
    return [name for name in sorted(set(saved) | set(restored)) if saved.get(name) != restored.get(name)]
