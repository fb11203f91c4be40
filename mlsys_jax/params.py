"""Parameters declared by spec: shape, dtype, logical axes and initializer, before any array exists.

A model describes its weights as a pytree of ``ParamSpec``; a plan turns that tree into
shardings, abstract arrays or real, already-sharded arrays. Nothing here knows about meshes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def normal(stddev: float) -> Initializer:
    """Gaussian with the given standard deviation."""
    return lambda key, shape, dtype: stddev * jax.random.normal(key, shape, dtype)


def fan_in(axis: int | tuple[int, ...] = 0, scale: float = 1.0) -> Initializer:
    """Gaussian scaled by 1/sqrt(fan-in), the fan-in being the product of the given dims."""
    axes = (axis,) if isinstance(axis, int) else axis

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        n = math.prod(shape[a] for a in axes)
        return (scale / math.sqrt(n)) * jax.random.normal(key, shape, dtype)

    return init


def ones(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """What a parameter is, without its values: one leaf of a model's spec tree."""

    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: Initializer = zeros
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(
                f"ParamSpec shape {self.shape} has {len(self.shape)} dims but logical axes "
                f"{self.logical_axes} name {len(self.logical_axes)}; give one name per dim"
            )

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * jnp.dtype(self.dtype).itemsize

    def stacked(self, n: int, axis_name: str = "layers") -> ParamSpec:
        """The same parameter repeated ``n`` times along a new leading axis (for ``lax.scan``)."""
        inner = self.init

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
            keys = jax.random.split(key, shape[0])
            return jax.vmap(lambda k: inner(k, shape[1:], dtype))(keys)

        return ParamSpec((n, *self.shape), (axis_name, *self.logical_axes), init, self.dtype)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def path_str(path: tuple[Any, ...]) -> str:
    """``('layers', 'attn', 'wq')``-style key path as ``'layers/attn/wq'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_leaves(specs: Any) -> list[tuple[str, ParamSpec]]:
    """(path, spec) for every parameter, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    return [(path_str(p), s) for p, s in leaves]


def specs_key(specs: Any) -> tuple[Any, ...]:
    """A hashable summary of a spec tree (every path, shape, dtype and logical axes), for caches
    of figures that depend on nothing else of it."""
    return tuple((path, s.shape, str(s.dtype), s.logical_axes) for path, s in spec_leaves(specs))


def init_params(specs: Any, key: jax.Array) -> Any:
    """Materialize a spec tree: leaf ``i`` uses ``fold_in(key, i)``, so values do not depend
    on where the arrays are placed."""
    leaves, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    arrays = [s.init(jax.random.fold_in(key, i), s.shape, s.dtype) for i, s in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def abstract_params(specs: Any) -> Any:
    """``jax.ShapeDtypeStruct`` for each parameter."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)


def count_params(specs: Any) -> int:
    return sum(s.size for _, s in spec_leaves(specs))
