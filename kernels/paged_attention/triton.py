"""Paged attention as a Pallas kernel for the Triton (GPU) lowering: backend ``pallas_triton``.

Made for decode steps and short prefill chunks. One program per (batch row, K/V head) holds all
the query heads of that K/V group and all the row's queries at once, as one tile of
``q_len * group`` rows (query i, head g of the group at row ``i * group + g``), padded to a power
of two >= 16 (Triton's dot). It walks the row's logical blocks that can hold a visible key (up to
``ceil(lengths[b] / block_size)``, fewer with causality and a sliding window), reads each block's
physical id from the block table (one scalar load), loads that block's keys and values straight
from the pool and keeps a running max and sum (online softmax) in fp32. Keys at positions
``>= lengths[b]``, after the query (causal) or outside the window are masked; a query that sees
no key gets zeros. head_dim is zero-padded to a power-of-two tile when it is not one (zeros
change no score; the padded output columns are sliced off). int8 pools come with ``k_scales``/
``v_scales`` (num_blocks, kv_heads): the program reads its K/V head's column of them, and widens
each loaded block as ``values.astype(f32) * scale[block]`` cast to q's dtype, as the reference does.

The gradient (w.r.t. q, and float pools or int8 pools' scales) is the reference's: the backward
recomputes the jnp specification and differentiates it, so the kernel serves training-time calls
too, only slowly; int8 values get no cotangent.
On CPU the kernel runs in Pallas's interpreter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlsys_jax.kernels.attention.options import FLOAT_DTYPES
from mlsys_jax.kernels.attention.reference import visible
from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.lowering import triton_params
from mlsys_jax.kernels.paged_attention.reference import with_reference_gradient

__all__ = ["BACKEND", "MAX_ROWS", "check", "paged_attention_triton"]

# A dimension a BlockSpec drops from the kernel's view (``pl.squeezed`` where the API has it).
_SQ = getattr(pl, "squeezed", None)
_LOG2E = math.log2(math.e)
# Triton's dot needs every operand dimension >= 16; head_dim beyond 256 overflows shared memory.
_MIN_DIM = 16
_MAX_HEAD_DIM = 256
_HEAD_DIM_STEP = 8
#: The most query rows (q_len * heads // kv_heads) one program holds; longer chunks belong to
#: flash attention over the gathered keys.
MAX_ROWS = 128
_MAX_BLOCK_SIZE = 256
_NUM_WARPS = 4
_NUM_STAGES = 2


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _tile(n: int) -> int:
    """The extent a kernel tile has along a dimension of size n: the next power of two >= 16."""
    return max(_MIN_DIM, pl.next_power_of_2(n))


def check(
    *, dtype, head_dim: int, q_len: int, heads: int, kv_heads: int, block_size: int, pages_dtype=None, **_
) -> str | None:
    """Why the Triton kernel cannot serve these arguments, or None (pools in q's dtype or int8)."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"the Triton kernel takes float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if pages_dtype is not None and jnp.dtype(pages_dtype) not in (jnp.dtype(dtype), jnp.dtype(jnp.int8)):
        return f"the Triton kernel reads pools in q's dtype or int8, not {jnp.dtype(pages_dtype).name}"
    if head_dim % _HEAD_DIM_STEP or not _HEAD_DIM_STEP <= head_dim <= _MAX_HEAD_DIM:
        return (
            f"the Triton kernel needs head_dim a multiple of {_HEAD_DIM_STEP} up to "
            f"{_MAX_HEAD_DIM} (padded to a power-of-two tile), got {head_dim}"
        )
    if not _power_of_two(block_size) or not _MIN_DIM <= block_size <= _MAX_BLOCK_SIZE:
        return (
            f"the Triton kernel loads one whole block per step and needs block_size a power of two "
            f"from {_MIN_DIM} to {_MAX_BLOCK_SIZE}, got {block_size}"
        )
    rows = q_len * (heads // max(kv_heads, 1))
    if rows > MAX_ROWS:
        return (
            f"the Triton kernel holds all q_len * heads // kv_heads = {rows} query rows of a K/V "
            f"group in one program, at most {MAX_ROWS} (decode steps and short chunks)"
        )
    return None


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    table_ref,
    length_ref,
    offset_ref,
    *refs,
    sm_scale: float,
    window: int | None,
    group: int,
    q_len: int,
    block_size: int,
    max_blocks: int,
    num_blocks: int,
    quantized: bool,
):
    if quantized:  # int8 pools: this K/V head's (num_blocks,) scales come before the output
        ks_ref, vs_ref, o_ref = refs
    else:
        (o_ref,), ks_ref, vs_ref = refs, None, None
    rows, dim = q_ref.shape
    length = length_ref[...]
    q_offset = offset_ref[...]
    q = q_ref[...]
    # Row r holds query r // group of the row's chunk, at position q_offset + r // group.
    q_pos = (q_offset + lax.div(jnp.arange(rows, dtype=jnp.int32), jnp.int32(group)))[:, None]
    scale = sm_scale * _LOG2E

    def body(j, carry):
        acc, m, l = carry
        block = jnp.clip(table_ref[j], 0, num_blocks - 1)
        k = _widen(k_ref[block, :, :], ks_ref, block, q.dtype)
        v = _widen(v_ref[block, :, :], vs_ref, block, q.dtype)
        s = _dot(q, k, (1, 1)) * scale
        k_pos = (j * block_size + jnp.arange(block_size, dtype=jnp.int32))[None, :]
        mask = visible(q_pos, k_pos, causal=True, window=window, kv_len=length)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Until a row has seen a visible key its max is -inf; shift by 0 then (p is 0 anyway).
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        rescale = jnp.exp2(m - shift)
        p = jnp.exp2(s - shift[:, None])
        acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, l * rescale + jnp.sum(p, axis=1)

    # Blocks that can hold a key some query sees: from the window's first key of the first query
    # to the last query's position (causal) or the row's last key, whichever comes first.
    last = jnp.minimum(length, q_offset + q_len)  # one past the last visible key position
    hi = jnp.minimum(lax.div(jnp.maximum(last, 0) + (block_size - 1), jnp.int32(block_size)), max_blocks)
    lo = jnp.int32(0) if window is None else lax.div(jnp.maximum(q_offset - window + 1, 0), jnp.int32(block_size))
    lo = jnp.minimum(lo, hi)
    init = (
        jnp.zeros((rows, dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, _, l = lax.fori_loop(lo, hi, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)  # a query that sees no key: acc is 0, so zeros
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)


def _widen(x: jax.Array, scale_ref, block, dtype) -> jax.Array:
    """A loaded (block_size, dim) block; int8 values widened by the block's scale, in q's dtype."""
    if scale_ref is None:
        return x
    return (x.astype(jnp.float32) * scale_ref[block]).astype(dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A matmul contracting dim ``contract[0]`` of a with ``contract[1]`` of b, accumulated in fp32.

    HIGHEST keeps fp32 inputs in IEEE fp32 on GPU (the default would round them to TF32).
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _forward(q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales, sm_scale, window, interpret):
    batch, q_len, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pages.shape
    max_blocks = block_tables.shape[1]
    group = heads // kv_heads
    rows, dim = q_len * group, _tile(head_dim)
    pad_rows = _tile(rows)
    quantized = k_scales is not None
    # (batch, q_len, heads, d) -> (batch, kv_heads, q_len * group, d): a K/V group's queries as rows.
    q_rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, rows, head_dim)
    q_rows = _pad_last(jnp.pad(q_rows, ((0, 0), (0, 0), (0, pad_rows - rows), (0, 0))), dim)
    k_pool, v_pool = _pad_last(k_pages, dim), _pad_last(v_pages, dim)

    row_block = pl.BlockSpec((_SQ, _SQ, pad_rows, dim), lambda b, h: (b, h, 0, 0))
    pool_block = pl.BlockSpec((num_blocks, block_size, _SQ, dim), lambda b, h: (0, 0, h, 0))
    scalar = pl.BlockSpec((_SQ,), lambda b, h: (b,))
    in_specs = [row_block, pool_block, pool_block, pl.BlockSpec((_SQ, max_blocks), lambda b, h: (b, 0)), scalar, scalar]
    args = [
        q_rows,
        k_pool,
        v_pool,
        block_tables.astype(jnp.int32),
        lengths.astype(jnp.int32),
        q_offset.astype(jnp.int32),
    ]
    if quantized:  # one K/V head's column of the (num_blocks, kv_heads) scales per program
        scale_block = pl.BlockSpec((num_blocks, _SQ), lambda b, h: (0, h))
        in_specs += [scale_block, scale_block]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        window=window,
        group=group,
        q_len=q_len,
        block_size=block_size,
        max_blocks=max_blocks,
        num_blocks=num_blocks,
        quantized=quantized,
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads),
        in_specs=in_specs,
        out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, pad_rows, dim), q.dtype),
        compiler_params=triton_params(_NUM_WARPS, _NUM_STAGES),
        interpret=interpret,
        name="paged_attention_triton",
    )(*args)
    out = out[:, :, :rows, :head_dim].reshape(batch, kv_heads, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)


_attend = with_reference_gradient(_forward)


def paged_attention_triton(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    q_offset: jax.Array,
    *,
    sm_scale: float,
    window: int | None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The ``pallas_triton`` backend: ``paged_attention_reference``'s contract, as one Triton kernel.

    q (batch, q_len, heads, head_dim); k_pages, v_pages (num_blocks, block_size, kv_heads,
    head_dim) in q's dtype, or int8 with ``k_scales``/``v_scales`` (num_blocks, kv_heads);
    block_tables (batch, max_blocks); lengths and q_offset (batch,) ints. Output in q's dtype.
    ``interpret=True`` runs the kernel in Pallas's interpreter (CPU).
    """
    if (k_scales is None) != (v_scales is None):
        raise ValueError("paged_attention_triton: pass k_scales and v_scales together (int8 pools) or neither")
    return _attend(
        q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales, sm_scale, window, interpret
    )


BACKEND = Backend("pallas_triton", ("gpu",), paged_attention_triton, check, interpretable=True)
