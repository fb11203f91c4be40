"""Flash attention as Pallas kernels for the Triton (GPU) lowering: backend ``pallas_triton``.

Forward: one program per (query block, batch, head) streams the key blocks it can see, keeping a
running max and sum (online softmax) in fp32, and writes the output and the log-sum-exp. Backward
(flash-attention-2): ``delta = rowsum(do * o)`` up front, then a dK/dV kernel per key block that
loops over the query heads of its K/V group and the query blocks that can see it, and a dQ kernel
per query block that loops over the key blocks it can see. Probabilities are recomputed from the
log-sum-exp. K/V are never repeated per query head: index maps pick the group's K/V head.

Sequences are padded to whole blocks in the wrappers; padded keys are masked, padded queries
sliced off. head_dim is zero-padded to a power-of-two tile (zeros change no score, and the padded
output and gradient columns are sliced off). Query offsets and key-value lengths reach the
kernels as one int32 scalar per batch row, and only when given. Causal and sliding-window masks,
offsets and lengths bound every loop (``key_block_range``, ``query_block_range``) so blocks with
no visible entry are never visited. On CPU the kernels run in Pallas's interpreter.
"""

from __future__ import annotations

import functools
import math
from typing import overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlsys_jax.kernels.attention.options import FLOAT_DTYPES, AttentionBlocks, AttentionOptions
from mlsys_jax.kernels.attention.reference import visible
from mlsys_jax.kernels.attention.vjp import pallas_backend
from mlsys_jax.kernels.lowering import triton_params

__all__ = [
    "BACKEND",
    "DEFAULTS",
    "backward",
    "candidates",
    "check",
    "effective_block",
    "forward",
    "key_block_range",
    "query_block_range",
]

# A dimension a BlockSpec drops from the kernel's view (``pl.squeezed`` where the API has it).
_SQ = getattr(pl, "squeezed", None)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Triton's dot needs every operand dimension >= 16; head_dim beyond 256 overflows shared memory.
# Other head_dims, multiples of 8, are zero-padded to the next power of two.
_MIN_DIM = 16
_MAX_HEAD_DIM = 256
_HEAD_DIM_STEP = 8


# --- which blocks can hold a visible entry ------------------------------------------------------


def _is_static(*xs) -> bool:
    return all(isinstance(x, int) for x in xs)


def _max(a, b):
    return max(a, b) if _is_static(a, b) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if _is_static(a, b) else jnp.minimum(a, b)


def _div(a, b: int):
    """a // b for a >= 0, on Python ints or traced int32 (lax.div avoids floor-division fixups)."""
    return a // b if _is_static(a) else lax.div(a, jnp.int32(b))


def _select(cond, a, b):
    return (a if cond else b) if _is_static(cond, a, b) else jnp.where(cond, a, b)


def _at(index, offset):
    """The position of query ``index`` in a row whose queries start at ``offset`` (None: at 0)."""
    return index if offset is None else index + offset


def _index_of(position, offset):
    """The query index at ``position`` in a row whose queries start at ``offset`` (None: at 0)."""
    return position if offset is None else position - offset


def _key_limit(seq_k: int, kv_len):
    """Keys at positions >= this are hidden: the row's length (None: unbounded), capped at seq_k."""
    return seq_k if kv_len is None else _min(kv_len, seq_k)


def _as_int(flag):
    """A bool as 0 or 1, on Python bools or traced ones."""
    return int(flag) if _is_static(flag) else flag.astype(jnp.int32)


def key_block_range(
    q_block,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    *,
    causal: bool,
    window: int | None,
    q_offset: int | jax.Array | None = None,
    kv_len: int | jax.Array | None = None,
):
    """Key blocks [lo, hi) that can hold a key visible to some query of ``q_block``.

    Queries of the block are [q_block * block_q, min(.. + block_q, seq_q)), at those positions
    plus ``q_offset``; a key j is visible to a query at position p when j <= p (causal),
    |p - j| < window (only p - j when causal) and j < ``kv_len``. Block indices, offset and
    length may be traced int32 (a program id, a row's scalar). Segment ids are not considered:
    they only hide more.
    """
    first_i = q_block * block_q
    first_q, last_q = _at(first_i, q_offset), _at(_min(first_i + block_q, seq_q) - 1, q_offset)
    # The keys some query of the block sees form one interval: the union of overlapping ones.
    first_k = 0 if window is None else _max(first_q - window + 1, 0)
    last_k = last_q if causal else (seq_k - 1 if window is None else last_q + window - 1)
    return _block_interval(first_k, _min(last_k, _key_limit(seq_k, kv_len) - 1), block_k, seq_k)


def query_block_range(
    k_block,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    *,
    causal: bool,
    window: int | None,
    q_offset: int | jax.Array | None = None,
    kv_len: int | jax.Array | None = None,
):
    """Query blocks [lo, hi) holding some query that sees a key of ``k_block`` (see ``key_block_range``)."""
    first_k = k_block * block_k
    last_k = _min(first_k + block_k, _key_limit(seq_k, kv_len)) - 1
    # Positions that see one of keys first_k..last_k form one interval, open below without causal
    # or window and above without window; shifting by the offset turns them into query indices.
    low = first_k if causal else (None if window is None else first_k - window + 1)
    if low is None:
        first_i = 0
    elif causal and q_offset is None:
        first_i = low  # a key block's first position, never negative
    else:
        first_i = _max(_index_of(low, q_offset), 0)
    last_i = seq_q - 1 if window is None else _min(_index_of(last_k + window - 1, q_offset), seq_q - 1)
    if kv_len is not None:
        # A block wholly past the row's length holds no visible key: push its queries past the end
        # (by arithmetic: a select here could be between two constants, see _block_interval).
        first_i = first_i + seq_q * _as_int(first_k > last_k)
    return _block_interval(first_i, last_i, block_q, seq_q)


def _block_interval(first, last, block: int, seq: int):
    """Blocks [lo, hi) covering positions first..last of a sequence; empty (lo == hi) when first > last."""
    lo = _min(_div(first, block), pl.cdiv(seq, block))
    # hi falls back to lo, never to a literal: Triton mis-lowers a select between two constants.
    return lo, _select(first > last, lo, _div(_max(last, 0), block) + 1)


# --- what the backend accepts -------------------------------------------------------------------


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check(*, dtype, head_dim: int, **_) -> str | None:
    """Why the Triton kernels cannot serve these arguments, or None."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"the Triton kernels take float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if head_dim % _HEAD_DIM_STEP or not _HEAD_DIM_STEP <= head_dim <= _MAX_HEAD_DIM:
        return (
            f"the Triton kernels need head_dim a multiple of {_HEAD_DIM_STEP} up to "
            f"{_MAX_HEAD_DIM} (padded to a power-of-two tile), got {head_dim}"
        )
    return None


def effective_block(block: int, seq: int, name: str) -> int:
    """The tile used along a sequence of length ``seq``: ``block``, shrunk for short sequences.

    Tiles are powers of two >= 16 (Triton's dot); a sequence shorter than ``block`` gets the
    smallest such tile that covers it.
    """
    if not _power_of_two(block) or block < _MIN_DIM:
        raise ValueError(
            f"pallas_triton: AttentionBlocks.{name}={block} must be a power of two >= {_MIN_DIM} "
            f"(Triton tiles). Fix: use e.g. {_MIN_DIM}, 32, 64 or 128."
        )
    return min(block, max(_MIN_DIM, pl.next_power_of_2(seq)))


def _head_tile(head_dim: int) -> int:
    """The head_dim the kernels see: the next power of two >= 16 (Triton's tiles and dot)."""
    return max(_MIN_DIM, pl.next_power_of_2(head_dim))


# --- kernel helpers -----------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A matmul contracting dim ``contract[0]`` of a with ``contract[1]`` of b, accumulated in fp32.

    HIGHEST keeps fp32 inputs in IEEE fp32 on GPU (the default would round them to TF32).
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _tile_mask(
    first_q,
    block_q: int,
    first_k,
    block_k: int,
    key_limit,
    opts: AttentionOptions,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
) -> jax.Array | None:
    """Which entries of a (block_q, block_k) tile are visible, or None when all of them are.

    ``first_q`` is a position (offset included); keys at ``key_limit`` and beyond (padding, or
    past the row's length) are hidden.
    """
    bounded = not _is_static(key_limit) or key_limit % block_k != 0
    if not (opts.causal or opts.window is not None or q_seg is not None or bounded):
        return None
    q_pos = (first_q + jnp.arange(block_q, dtype=jnp.int32))[:, None]
    k_pos = (first_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
    return visible(
        q_pos,
        k_pos,
        causal=opts.causal,
        window=opts.window,
        q_seg=None if q_seg is None else q_seg[:, None],
        kv_seg=None if kv_seg is None else kv_seg[None, :],
        kv_len=key_limit if bounded else None,
    )


def _scores(q, k, first_q, first_k, key_limit, opts, q_seg, kv_seg) -> jax.Array:
    """Masked scores in base 2: sm_scale * log2(e) * q k^T, -inf where hidden."""
    s = _dot(q, k, (1, 1)) * (opts.sm_scale * _LOG2E)
    mask = _tile_mask(first_q, q.shape[0], first_k, k.shape[0], key_limit, opts, q_seg, kv_seg)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


@overload
def _pad(x: jax.Array, axis: int, size: int, value: float = 0) -> jax.Array: ...
@overload
def _pad(x: None, axis: int, size: int, value: float = 0) -> None: ...
def _pad(x: jax.Array | None, axis: int, size: int, value: float = 0) -> jax.Array | None:
    """``x`` padded with ``value`` at the end of ``axis`` up to ``size``."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _split_refs(refs, n_inputs: int, segments: bool, offsets: bool, lengths: bool):
    """A kernel's refs as (its n_inputs fixed inputs, [q_seg, kv_seg, q_offset, kv_len], outputs).

    The optional inputs follow the fixed ones in that order, each only when present (else None).
    """
    rest = iter(refs[n_inputs:])
    optional = [next(rest) if present else None for present in (segments, segments, offsets, lengths)]
    return refs[:n_inputs], optional, list(rest)


def _row_scalars(offset_ref, length_ref, seq_k: int):
    """This row's query offset (None: 0) and key limit (seq_k, or its kv length capped at seq_k)."""
    q_offset = None if offset_ref is None else offset_ref[...]
    kv_len = None if length_ref is None else length_ref[...]
    return q_offset, kv_len, _key_limit(seq_k, kv_len)


def _row_inputs(q_offset: jax.Array | None, kv_lengths: jax.Array | None):
    """BlockSpecs and arrays for the per-row scalars given: each program reads its batch row's
    value as a 0-d block (batch is grid axis 1 in every kernel here)."""
    given = [x.astype(jnp.int32) for x in (q_offset, kv_lengths) if x is not None]
    return [pl.BlockSpec((_SQ,), lambda i, bi, h: (bi,)) for _ in given], given


# --- forward ------------------------------------------------------------------------------------


def _forward_kernel(
    *refs,
    opts: AttentionOptions,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    segments: bool,
    offsets: bool,
    lengths: bool,
):
    (q_ref, k_ref, v_ref), optional, (o_ref, lse_ref) = _split_refs(refs, 3, segments, offsets, lengths)
    q_seg_ref, kv_seg_ref, offset_ref, length_ref = optional
    q_offset, kv_len, key_limit = _row_scalars(offset_ref, length_ref, seq_k)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    q_block = pl.program_id(0)
    first_q = _at(q_block * block_q, q_offset)
    q = q_ref[...]
    head_dim = q.shape[-1]

    def body(kb, carry):
        acc, m, l = carry
        first_k = pl.multiple_of(kb * block_k, block_k)
        keys = pl.ds(first_k, block_k)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
        s = _scores(q, k_ref[keys, :], first_q, first_k, key_limit, opts, q_seg, kv_seg)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Until a row has seen a visible key its max is -inf; shift by 0 then (p is 0 anyway).
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        rescale = jnp.exp2(m - shift)
        p = jnp.exp2(s - shift[:, None])
        v = v_ref[keys, :]
        acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, l * rescale + jnp.sum(p, axis=1)

    lo, hi = key_block_range(
        q_block,
        block_q,
        block_k,
        seq_q,
        seq_k,
        causal=opts.causal,
        window=opts.window,
        q_offset=q_offset,
        kv_len=kv_len,
    )
    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    empty = l == 0.0  # a query that sees no key: zeros, lse = +inf
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, (m + jnp.log2(l_safe)) * _LN2)


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    q_offset: jax.Array | None,
    kv_lengths: jax.Array | None,
    opts: AttentionOptions,
) -> tuple[jax.Array, jax.Array]:
    """Attention output (B, S, H, D) in q's dtype and log-sum-exp (B, H, S) fp32."""
    b, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_q = effective_block(opts.blocks.block_q, seq_q, "block_q")
    block_k = effective_block(opts.blocks.block_k, seq_k, "block_k")
    nq, nk = pl.cdiv(seq_q, block_q), pl.cdiv(seq_k, block_k)
    pad_q, pad_k, dim = nq * block_q, nk * block_k, _head_tile(head_dim)
    segments = q_seg is not None

    qkv_block = lambda rows: (_SQ, rows, _SQ, dim)
    in_specs = [
        pl.BlockSpec(qkv_block(block_q), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec(qkv_block(pad_k), lambda i, bi, h: (bi, 0, lax.div(h, group), 0)),
        pl.BlockSpec(qkv_block(pad_k), lambda i, bi, h: (bi, 0, lax.div(h, group), 0)),
    ]
    args = [_pad(_pad(q, 1, pad_q), 3, dim), _pad(_pad(k, 1, pad_k), 3, dim), _pad(_pad(v, 1, pad_k), 3, dim)]
    if segments:
        in_specs += [
            pl.BlockSpec((_SQ, block_q), lambda i, bi, h: (bi, i)),
            pl.BlockSpec((_SQ, pad_k), lambda i, bi, h: (bi, 0)),
        ]
        args += [_pad(q_seg, 1, pad_q), _pad(kv_seg, 1, pad_k)]
    row_specs, row_args = _row_inputs(q_offset, kv_lengths)
    kernel = functools.partial(
        _forward_kernel,
        opts=opts,
        block_q=block_q,
        block_k=block_k,
        seq_q=seq_q,
        seq_k=seq_k,
        segments=segments,
        offsets=q_offset is not None,
        lengths=kv_lengths is not None,
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, b, heads),
        in_specs=in_specs + row_specs,
        out_specs=[
            pl.BlockSpec(qkv_block(block_q), lambda i, bi, h: (bi, i, h, 0)),
            pl.BlockSpec((_SQ, _SQ, block_q), lambda i, bi, h: (bi, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, pad_q, heads, dim), q.dtype),
            jax.ShapeDtypeStruct((b, heads, pad_q), jnp.float32),
        ],
        compiler_params=triton_params(opts.blocks.num_warps, opts.blocks.num_stages),
        interpret=opts.interpret,
        name="flash_attention_fwd_triton",
    )(*args, *row_args)
    return o[:, :seq_q, :, :head_dim], lse[:, :, :seq_q]


# --- backward -----------------------------------------------------------------------------------


def _dkdv_kernel(
    *refs,
    opts: AttentionOptions,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    group: int,
    segments: bool,
    offsets: bool,
    lengths: bool,
):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), optional, (dk_ref, dv_ref) = _split_refs(
        refs, 6, segments, offsets, lengths
    )
    q_seg_ref, kv_seg_ref, offset_ref, length_ref = optional
    q_offset, kv_len, key_limit = _row_scalars(offset_ref, length_ref, seq_k)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    k_block = pl.program_id(0)
    first_k = k_block * block_k
    k, v = k_ref[...], v_ref[...]
    lo, hi = query_block_range(
        k_block,
        block_q,
        block_k,
        seq_q,
        seq_k,
        causal=opts.causal,
        window=opts.window,
        q_offset=q_offset,
        kv_len=kv_len,
    )

    def head_body(g, carry):
        def query_body(qb, carry):
            dk, dv = carry
            first_i = pl.multiple_of(qb * block_q, block_q)
            rows = pl.ds(first_i, block_q)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            q_seg = None if q_seg_ref is None else q_seg_ref[rows]
            s = _scores(q, k, _at(first_i, q_offset), first_k, key_limit, opts, q_seg, kv_seg)
            p = jnp.exp2(s - (lse_ref[g, rows] * _LOG2E)[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
            ds = p * (_dot(do, v, (1, 1)) - delta_ref[g, rows][:, None])
            dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
            return dk, dv

        return lax.fori_loop(lo, hi, query_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * opts.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    *refs,
    opts: AttentionOptions,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    segments: bool,
    offsets: bool,
    lengths: bool,
):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), optional, (dq_ref,) = _split_refs(
        refs, 6, segments, offsets, lengths
    )
    q_seg_ref, kv_seg_ref, offset_ref, length_ref = optional
    q_offset, kv_len, key_limit = _row_scalars(offset_ref, length_ref, seq_k)
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    q_block = pl.program_id(0)
    first_q = _at(q_block * block_q, q_offset)
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...] * _LOG2E
    delta = delta_ref[...]

    def body(kb, dq):
        first_k = pl.multiple_of(kb * block_k, block_k)
        keys = pl.ds(first_k, block_k)
        k = k_ref[keys, :]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
        s = _scores(q, k, first_q, first_k, key_limit, opts, q_seg, kv_seg)
        p = jnp.exp2(s - lse2[:, None])
        ds = p * (_dot(do, v_ref[keys, :], (1, 1)) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    lo, hi = key_block_range(
        q_block,
        block_q,
        block_k,
        seq_q,
        seq_k,
        causal=opts.causal,
        window=opts.window,
        q_offset=q_offset,
        kv_len=kv_len,
    )
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * opts.sm_scale).astype(dq_ref.dtype)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    q_offset: jax.Array | None,
    kv_lengths: jax.Array | None,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    opts: AttentionOptions,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq, dk, dv of the attention output with cotangent ``do``, in the inputs' dtypes."""
    b, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    block_q = effective_block(opts.blocks.block_q_bwd, seq_q, "block_q_bwd")
    block_k = effective_block(opts.blocks.block_k_bwd, seq_k, "block_k_bwd")
    nq, nk = pl.cdiv(seq_q, block_q), pl.cdiv(seq_k, block_k)
    pad_q, pad_k, dim = nq * block_q, nk * block_k, _head_tile(head_dim)
    segments = q_seg is not None

    # delta_i = sum_d do_id o_id: the softmax's correction term, once per query row.
    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), o.astype(jnp.float32))
    q_p, do_p = _pad(_pad(q, 1, pad_q), 3, dim), _pad(_pad(do.astype(q.dtype), 1, pad_q), 3, dim)
    k_p, v_p = _pad(_pad(k, 1, pad_k), 3, dim), _pad(_pad(v, 1, pad_k), 3, dim)
    # Padded query rows get lse = +inf, so their probabilities (and gradients) are 0.
    lse_p, delta_p = _pad(lse, 2, pad_q, jnp.inf), _pad(delta, 2, pad_q)
    seg_args = [_pad(q_seg, 1, pad_q), _pad(kv_seg, 1, pad_k)] if segments else []
    row_specs, row_args = _row_inputs(q_offset, kv_lengths)
    statics = {
        "opts": opts,
        "block_q": block_q,
        "block_k": block_k,
        "seq_q": seq_q,
        "seq_k": seq_k,
        "segments": segments,
        "offsets": q_offset is not None,
        "lengths": kv_lengths is not None,
    }
    rows = lambda n: (_SQ, n, _SQ, dim)

    # dK, dV: one program per (key block, batch, K/V head), looping over the group's query heads.
    group_rows = pl.BlockSpec((_SQ, pad_q, group, dim), lambda j, bi, kh: (bi, 0, kh, 0))
    group_stats = pl.BlockSpec((_SQ, group, pad_q), lambda j, bi, kh: (bi, kh, 0))
    kv_block = pl.BlockSpec(rows(block_k), lambda j, bi, kh: (bi, j, kh, 0))
    in_specs = [group_rows, kv_block, kv_block, group_rows, group_stats, group_stats]
    if segments:
        in_specs += [
            pl.BlockSpec((_SQ, pad_q), lambda j, bi, kh: (bi, 0)),
            pl.BlockSpec((_SQ, block_k), lambda j, bi, kh: (bi, j)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, group=group, **statics),
        grid=(nk, b, kv_heads),
        in_specs=in_specs + row_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k_p.shape, k.dtype), jax.ShapeDtypeStruct(v_p.shape, v.dtype)],
        compiler_params=triton_params(opts.blocks.num_warps, opts.blocks.num_stages),
        interpret=opts.interpret,
        name="flash_attention_dkdv_triton",
    )(q_p, k_p, v_p, do_p, lse_p, delta_p, *seg_args, *row_args)

    # dQ: one program per (query block, batch, head), looping over the key blocks it sees.
    q_block = pl.BlockSpec(rows(block_q), lambda i, bi, h: (bi, i, h, 0))
    kv_full = pl.BlockSpec(rows(pad_k), lambda i, bi, h: (bi, 0, lax.div(h, group), 0))
    stats = pl.BlockSpec((_SQ, _SQ, block_q), lambda i, bi, h: (bi, h, i))
    in_specs = [q_block, kv_full, kv_full, q_block, stats, stats]
    if segments:
        in_specs += [
            pl.BlockSpec((_SQ, block_q), lambda i, bi, h: (bi, i)),
            pl.BlockSpec((_SQ, pad_k), lambda i, bi, h: (bi, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **statics),
        grid=(nq, b, heads),
        in_specs=in_specs + row_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
        compiler_params=triton_params(opts.blocks.num_warps, opts.blocks.num_stages),
        interpret=opts.interpret,
        name="flash_attention_dq_triton",
    )(q_p, k_p, v_p, do_p, lse_p, delta_p, *seg_args, *row_args)
    return tuple(x[:, :n, :, :head_dim] for x, n in ((dq, seq_q), (dk, seq_k), (dv, seq_k)))


# --- block sizes and the backend ----------------------------------------------------------------

#: Default tiles per device kind (substring of ``jax.Device.device_kind``); "cpu" is the
#: interpreter, where every block is a loop step, so blocks are few.
DEFAULTS = {
    "H200": AttentionBlocks(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3),
    "H100": AttentionBlocks(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=3),
    "A100": AttentionBlocks(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=2),
    "cpu": AttentionBlocks(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32),
}


def candidates(platform: str) -> list[AttentionBlocks]:
    """Tiles autotuning tries: on a GPU, forward 64/128 with half-size backward tiles and a few
    warp/stage counts; interpreted, two small sizes (only to exercise the machinery)."""
    if platform == "gpu":
        return [
            AttentionBlocks(bq, bk, bq // 2, bk // 2, w, st)
            for bq in (64, 128)
            for bk in (64, 128)
            for w in (4, 8)
            for st in (2, 3)
        ]
    return [AttentionBlocks(bq, bk, bq, bk) for bq in (16, 32) for bk in (16, 32)]


BACKEND = pallas_backend("pallas_triton", ("gpu",), forward, backward, check, DEFAULTS, candidates)
