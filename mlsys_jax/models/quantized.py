"""Weight-only int8 (and the int8 KV-cache pools' specs): a matmul weight kept as int8 values and one fp32 scale per output channel,
widened to the compute dtype where a model piece uses it.

    scale_c = max_i |W_ic| / 127,    Q_ic = round(W_ic / scale_c),    W ~ Q * scale

The input (contracting) dims of each weight are the family's to name (``LanguageModel.
quantizable``); a tied embedding is scaled per row, which is per output channel of the head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.paged_attention import Int8Pages
from mlsys_jax.params import ParamSpec, zeros


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """int8 ``values`` and fp32 ``scale`` (the input dims kept as size 1, so it broadcasts)."""

    values: jax.Array
    scale: jax.Array

    def dequantize(self, dtype: Any) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


jax.tree_util.register_dataclass(Int8Weight, data_fields=["values", "scale"], meta_fields=[])


def is_int8(x: Any) -> bool:
    return isinstance(x, Int8Weight)


def quantize_int8(w: jax.Array, input_axes: tuple[int, ...]) -> Int8Weight:
    """Symmetric per-output-channel int8 of ``w``, reducing over ``input_axes``."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=input_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return Int8Weight(jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale)


def as_compute(w: Any, dtype: Any) -> jax.Array:
    """A weight in the compute dtype, whether it is stored plain or as int8."""
    return w.dequantize(dtype) if is_int8(w) else w.astype(dtype)


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Every weight of a tree in the compute dtype (int8 ones widened)."""
    return jax.tree_util.tree_map(lambda w: as_compute(w, dtype), tree, is_leaf=is_int8)


def quantize_params(params: Any, quantizable: Mapping[str, tuple[int, ...]]) -> Any:
    """``params`` with each weight at a ``quantizable`` path (``layers/wq``) stored as int8,
    reducing over the input axes it names; the rest (norms) unchanged."""

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, Mapping):
            return {
                k: walk(v, f"{prefix}{k}") if not isinstance(v, Mapping) else walk(v, f"{prefix}{k}/")
                for k, v in node.items()
            }
        return quantize_int8(node, quantizable[prefix]) if prefix in quantizable else node

    return walk(params, "")


def weight_bytes(params: Any) -> int:
    """Bytes the weights take as stored (int8 values and scales, plain arrays as they are)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_int8)
    return sum(w.nbytes if is_int8(w) else int(w.size * w.dtype.itemsize) for w in leaves)


def int8_page_spec(spec: ParamSpec) -> Int8Pages:
    """The int8 form of a KV-cache pool spec (..., num_blocks, block_size, kv_heads, head_dim):
    int8 values placed like the pool, and one fp32 scale per block and K/V head."""
    lead, heads = spec.shape[:-3], spec.shape[-2]
    axes = (*spec.logical_axes[:-3], spec.logical_axes[-2])
    return Int8Pages(
        ParamSpec(spec.shape, spec.logical_axes, zeros, jnp.int8),  # pyright: ignore[reportArgumentType]
        ParamSpec((*lead, heads), axes, zeros, jnp.float32),  # pyright: ignore[reportArgumentType]
    )
