"""The pools a paged KV cache keeps: plain arrays in the compute dtype, or int8 with one scale
per block and K/V head.

    scale[b, h] = max |x| over block b's written slots of head h / 127,   Q = round(x / scale)

A block fills one token at a time while decoding, so its scale can only grow: a write whose
values exceed the block's scale raises it and requantizes the block's earlier values onto the
new scale (``round(Q * old / new)``, at most half a step of the new scale off each time), and a
write at offset 0 starts the block afresh (a block handed back and taken again forgets the
sequence it held before). Blocks a write does not touch keep their values bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import overload

import jax
import jax.numpy as jnp

__all__ = ["Int8Pages", "dequantize_blocks", "is_int8_pages", "quantize_blocks", "write"]

_QMAX = 127.0


@dataclasses.dataclass(frozen=True)
class Int8Pages:
    """int8 ``values`` (num_blocks, block_size, kv_heads, head_dim), any leading axes before them
    (layers), and fp32 ``scale`` (num_blocks, kv_heads) with the same leading axes."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


jax.tree_util.register_dataclass(Int8Pages, data_fields=["values", "scale"], meta_fields=[])


def is_int8_pages(x: object) -> bool:
    return isinstance(x, Int8Pages)


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale > 0, scale, 1.0)


def _round(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(x), -_QMAX, _QMAX).astype(jnp.int8)


def quantize_blocks(pages: jax.Array) -> Int8Pages:
    """A whole pool (num_blocks, block_size, kv_heads, head_dim) as int8, each block and head on
    its own absmax scale."""
    x = pages.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=(1, 3)) / _QMAX  # (num_blocks, kv_heads)
    return Int8Pages(_round(x / _safe(scale)[:, None, :, None]), scale)


def dequantize_blocks(values: jax.Array, scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Blocks (..., block_size, kv_heads, head_dim) of int8 with scales (..., kv_heads), widened."""
    return (values.astype(jnp.float32) * scale[..., None, :, None]).astype(dtype)


def _scatter_rows(flat: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
    """``flat.at[index].set(rows)``, kept a scatter when it writes a single row: XLA rewrites a
    one-index scatter as a dynamic-update-slice, which its CPU backend then duplicates into every
    reader of the pool, copying the whole pool each layer; writing that row twice (the same value
    to the same place) keeps it one in-place scatter."""
    if index.shape[0] == 1:
        index, rows = jnp.concatenate([index, index]), jnp.concatenate([rows, rows])
    return flat.at[index].set(rows)


def _write_plain(pool: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    flat = pool.reshape(-1, *pool.shape[2:])
    flat = _scatter_rows(flat, slots.reshape(-1), new.reshape(-1, *new.shape[2:]).astype(pool.dtype))
    return flat.reshape(pool.shape)


def _write_int8(pool: Int8Pages, new: jax.Array, slots: jax.Array) -> Int8Pages:
    num_blocks, block_size = pool.values.shape[:2]
    slots = slots.reshape(-1)
    new = new.reshape(-1, *new.shape[2:]).astype(jnp.float32)  # (tokens, kv_heads, head_dim)
    blocks, offsets = slots // block_size, slots % block_size
    fresh = jnp.zeros((num_blocks,), bool).at[blocks].max(offsets == 0)
    old = jnp.where(fresh[:, None], 0.0, pool.scale)
    scale = jnp.maximum(old, jnp.zeros_like(old).at[blocks].max(jnp.max(jnp.abs(new), axis=-1) / _QMAX))
    # Requantize every touched block onto its new scale (a block touched by several tokens is
    # computed identically for each, so the duplicate writes agree); fresh blocks start at 0.
    ratio = (old / _safe(scale))[blocks]  # (tokens, kv_heads)
    touched = _round(pool.values[blocks].astype(jnp.float32) * ratio[:, None, :, None])
    values = _scatter_rows(pool.values, blocks, touched)
    flat = values.reshape(-1, *values.shape[2:])
    flat = _scatter_rows(flat, slots, _round(new / _safe(scale)[blocks][..., None]))
    return Int8Pages(flat.reshape(values.shape), scale)


@overload
def write(pool: Int8Pages, new: jax.Array, slots: jax.Array) -> Int8Pages: ...
@overload
def write(pool: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array: ...
def write(pool: jax.Array | Int8Pages, new: jax.Array, slots: jax.Array) -> jax.Array | Int8Pages:
    """``pool`` (num_blocks, block_size, ...) with ``new`` (batch, seq, ...) written at the flat
    slots (batch, seq) ``block * block_size + offset``; nothing is copied when a sequence grows.
    An ``Int8Pages`` pool is written as the module says (scales grow, fresh blocks restart)."""
    if isinstance(pool, Int8Pages):
        return _write_int8(pool, new, slots)
    return _write_plain(pool, new, slots)
