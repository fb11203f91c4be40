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
change no score; the padded output columns are sliced off).

The gradient (w.r.t. q and the pools) is the reference's: the backward recomputes the jnp
specification and differentiates it, so the kernel serves training-time calls too, only slowly.
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
from mlsys_jax.kernels.paged_attention.reference import paged_attention_reference

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
    """Why the Triton kernel cannot serve these arguments, or None."""
    if pages_dtype is not None and jnp.dtype(pages_dtype) == jnp.int8:
        return "the Triton kernel reads pools in the compute dtype, not int8 ones"
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"the Triton kernel takes float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
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
    o_ref,
    *,
    sm_scale: float,
    window: int | None,
    group: int,
    q_len: int,
    block_size: int,
    max_blocks: int,
    num_blocks: int,
):
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
        k = k_ref[block, :, :]
        v = v_ref[block, :, :]
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


def _forward(q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale, window, interpret):
    batch, q_len, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pages.shape
    max_blocks = block_tables.shape[1]
    group = heads // kv_heads
    rows, dim = q_len * group, _tile(head_dim)
    pad_rows = _tile(rows)
    # (batch, q_len, heads, d) -> (batch, kv_heads, q_len * group, d): a K/V group's queries as rows.
    q_rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, kv_heads, rows, head_dim)
    q_rows = _pad_last(jnp.pad(q_rows, ((0, 0), (0, 0), (0, pad_rows - rows), (0, 0))), dim)
    k_pool, v_pool = _pad_last(k_pages, dim), _pad_last(v_pages, dim)

    row_block = pl.BlockSpec((_SQ, _SQ, pad_rows, dim), lambda b, h: (b, h, 0, 0))
    pool_block = pl.BlockSpec((num_blocks, block_size, _SQ, dim), lambda b, h: (0, 0, h, 0))
    scalar = pl.BlockSpec((_SQ,), lambda b, h: (b,))
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        window=window,
        group=group,
        q_len=q_len,
        block_size=block_size,
        max_blocks=max_blocks,
        num_blocks=num_blocks,
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads),
        in_specs=[
            row_block,
            pool_block,
            pool_block,
            pl.BlockSpec((_SQ, max_blocks), lambda b, h: (b, 0)),
            scalar,
            scalar,
        ],
        out_specs=row_block,
        out_shape=jax.ShapeDtypeStruct((batch, kv_heads, pad_rows, dim), q.dtype),
        compiler_params=triton_params(_NUM_WARPS, _NUM_STAGES),
        interpret=interpret,
        name="paged_attention_triton",
    )(
        q_rows,
        k_pool,
        v_pool,
        block_tables.astype(jnp.int32),
        lengths.astype(jnp.int32),
        q_offset.astype(jnp.int32),
    )
    out = out[:, :, :rows, :head_dim].reshape(batch, kv_heads, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attend(q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale, window, interpret):
    return _forward(q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale, window, interpret)


def _attend_fwd(q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale, window, interpret):
    out = _forward(q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale, window, interpret)
    return out, (q, k_pages, v_pages, block_tables, lengths, q_offset)


def _attend_bwd(sm_scale, window, interpret, res, do):
    del interpret
    q, k_pages, v_pages, block_tables, lengths, q_offset = res

    def spec(q, k_pages, v_pages):
        return paged_attention_reference(
            q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale=sm_scale, window=window
        )

    _, pullback = jax.vjp(spec, q, k_pages, v_pages)
    dq, dk, dv = pullback(do)
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


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
    interpret: bool = False,
) -> jax.Array:
    """The ``pallas_triton`` backend: ``paged_attention_reference``'s contract, as one Triton kernel.

    q (batch, q_len, heads, head_dim); k_pages, v_pages (num_blocks, block_size, kv_heads,
    head_dim); block_tables (batch, max_blocks); lengths and q_offset (batch,) ints. Output in
    q's dtype. ``interpret=True`` runs the kernel in Pallas's interpreter (CPU).
    """
    return _attend(q, k_pages, v_pages, block_tables, lengths, q_offset, sm_scale, window, interpret)


BACKEND = Backend("pallas_triton", ("gpu",), paged_attention_triton, check, interpretable=True)
