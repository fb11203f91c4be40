"""The parameters a train step computes with: the fp32 masters cast to the model's compute dtype."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.models.base import LanguageModel


def cast_for_compute(model: LanguageModel, params: Any, shardings: Any = None) -> Any:
    """The floating parameters in the model's compute dtype. With ``shardings`` each cast is
    pinned to its parameter's own sharding, so the partitioner gathers the narrow copy rather
    than the fp32 master; without (inside a ``shard_map``), a plain cast."""
    if model.compute_dtype is None:
        return params

    def cast(p: jax.Array, sharding: Any = None) -> jax.Array:
        if not jnp.issubdtype(p.dtype, jnp.floating) or p.dtype == model.compute_dtype:
            return p
        narrow = p.astype(model.compute_dtype)
        return narrow if sharding is None else jax.lax.with_sharding_constraint(narrow, sharding)

    if shardings is None:
        return jax.tree_util.tree_map(cast, params)
    return jax.tree_util.tree_map(cast, params, shardings)
