"""Paged attention as a Pallas TPU (Mosaic) kernel: backend ``pallas_tpu``.

Made for decode steps and short prefill chunks. The grid is (batch row, logical block), blocks
innermost. Each row's block-table entries, length and query offset are prefetched into SMEM
(``PrefetchScalarGridSpec``; the table flattened to one dimension, since SMEM pads a 2-D array's
rows), where the K/V index map reads physical block ``block_tables[b, j]``: the pipeline copies
exactly the blocks a row uses from the pool into VMEM, one step ahead of the compute. Steps
outside the row's useful blocks (past its length or its last query, before its sliding window)
repeat the nearest useful block's index, which the pipeline does not fetch again, and skip the
compute (``pl.when``). The online softmax state (running max, sum, fp32 accumulator) lives in
VMEM scratch for the whole row and the output is written once, at its last step.

Layout. A step loads one whole block of every K/V head, (block_size, kv_heads, head_dim), from
the pool as it lies in HBM: its last two dims equal the pool's, which Mosaic accepts for any
kv_heads and head_dim, and the pool is never transposed or padded (copying a pool per call
would cost more than the attention it feeds). The kernel reads K/V head h as ``ref[:, h, :]``.
The queries are small, so the wrapper rearranges them as (batch, kv_heads, rows, head_dim):
the ``q_len * group`` queries sharing a K/V head (query i, head g at row ``i * group + g``),
padded to a multiple of 8 sublanes, so a group attends in one matmul per head and block.

int8 pools come with ``k_scales``/``v_scales`` (num_blocks, kv_heads); the same index map picks
block ``block_tables[b, j]``'s (1, kv_heads) row of them, and the kernel widens each loaded head
as ``values.astype(f32) * scale`` cast to q's dtype, as the reference does.

The gradient (w.r.t. q, and float pools or int8 pools' scales) is the reference's: the backward
differentiates the jnp specification. On CPU the kernel runs in the TPU interpreter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.lowering import tpu_interpret, tpu_params
from mlsys_jax.kernels.paged_attention.reference import with_reference_gradient

__all__ = ["BACKEND", "MAX_QUERY_ROWS", "block_range", "check", "paged_attention_tpu"]

LANES = 128  # the minor (lane) width of a TPU vreg
SUBLANES = 8  # the second-minor (sublane) width
_SQ = getattr(pl, "squeezed", None)  # a block dim of 1 dropped from the kernel's view
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
#: The most query rows (q_len * heads) one batch row holds in VMEM; longer chunks belong to
#: flash attention over the gathered keys.
MAX_QUERY_ROWS = 2048


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _div(a, b: int):
    """a // b for a >= 0 as plain integer division (cheap in Mosaic's scalar unit)."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def block_range(length, q_offset, *, q_len: int, block_size: int, max_blocks: int, window: int | None):
    """[first, end) of a row's logical blocks that hold a key some query of the row sees.

    The last visible key is before the row's length and at or before its last query; with a
    window w the first query sees nothing before ``q_offset - w + 1``. Empty (first == end)
    when no query sees a key. Takes Python ints or traced int32 scalars.
    """
    last = jnp.minimum(length, q_offset + q_len)  # one past the last visible key position
    end = jnp.minimum(_div(jnp.maximum(last, 0) + (block_size - 1), block_size), max_blocks)
    first = 0 if window is None else _div(jnp.maximum(q_offset - window + 1, 0), block_size)
    return jnp.minimum(first, end), end


@dataclasses.dataclass(frozen=True)
class _Static:
    """Shape and mask facts the kernel and its index maps close over."""

    sm_scale: float
    window: int | None
    group: int
    q_len: int
    kv_heads: int
    block_size: int
    max_blocks: int
    num_blocks: int
    quantized: bool

    def blocks(self, length, q_offset):
        return block_range(
            length,
            q_offset,
            q_len=self.q_len,
            block_size=self.block_size,
            max_blocks=self.max_blocks,
            window=self.window,
        )

    def physical(self, b, j, tables, lengths, offsets):
        """The pool block grid step (b, j) fetches: block_tables[b, j] for a useful j, else the
        nearest useful block's (no new copy); clipped into the pool like the reference's gather."""
        first, end = self.blocks(lengths[b], offsets[b])
        j = jnp.clip(jnp.minimum(jnp.maximum(j, first), end - 1), 0, self.max_blocks - 1)
        return jnp.clip(tables[b * self.max_blocks + j], 0, self.num_blocks - 1)

    def mask(self, shape: tuple[int, int], j, length, q_offset) -> jax.Array:
        """Visibility of block j's keys (lanes) to the group's query rows (sublanes).

        Row r is query i = r // group; with rel = key - q_offset, query i sees the key when
        i >= rel (causal) and i < rel + window, i.e. r >= group * rel and r < group * (rel +
        window): no vector division.
        """
        row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        key = j * self.block_size + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        rel = key - q_offset
        ok = (key < length) & (row >= self.group * rel)
        if self.window is not None:
            ok &= row < self.group * (rel + self.window)
        return ok


def _widen(ref, scale_ref, h: int, dtype) -> jax.Array:
    """K/V head h of the loaded block, int8 values widened by their (block, head) scale."""
    x = ref[:, h, :]
    if scale_ref is None:
        return x
    return (x.astype(jnp.float32) * scale_ref[:, h : h + 1]).astype(dtype)


def _kernel(tables_ref, lengths_ref, offsets_ref, q_ref, k_ref, v_ref, *refs, t: _Static):
    if t.quantized:
        ks_ref, vs_ref, o_ref, m_sc, l_sc, acc_sc = refs
    else:
        (o_ref, m_sc, l_sc, acc_sc), ks_ref, vs_ref = refs, None, None
    b, j = pl.program_id(0), pl.program_id(1)
    length, q_offset = lengths_ref[b], offsets_ref[b]
    first, end = t.blocks(length, q_offset)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= first) & (j < end))  # then j is the block the index maps fetched
    def _step():
        mask = t.mask((q_ref.shape[1], t.block_size), j, length, q_offset)
        for h in range(t.kv_heads):
            q = q_ref[h]  # (rows, head_dim)
            k = _widen(k_ref, ks_ref, h, q.dtype)  # (block_size, head_dim)
            v = _widen(v_ref, vs_ref, h, q.dtype)
            s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * t.sm_scale
            s = jnp.where(mask, s, -jnp.inf)
            m_prev = m_sc[h]  # (rows, 128): the row max repeated across lanes
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows with nothing visible yet
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[h] = m_next
            pv = jax.lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
            acc_sc[h] = acc_sc[h] * alpha[:, :1] + pv

    @pl.when(j == t.max_blocks - 1)
    def _finish():
        l = l_sc[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)  # a query that sees no key: acc is 0, so zeros
        o_ref[...] = (acc_sc[...] * (1.0 / l_safe)[..., :1]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnums=(8, 9, 10))
def _forward(q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales, sm_scale, window, interpret):
    batch, q_len, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pages.shape
    max_blocks = block_tables.shape[1]
    group = heads // kv_heads
    rows = q_len * group
    padded = _round_up(rows, SUBLANES)
    t = _Static(
        sm_scale=float(sm_scale),
        window=window,
        group=group,
        q_len=q_len,
        kv_heads=kv_heads,
        block_size=block_size,
        max_blocks=max_blocks,
        num_blocks=num_blocks,
        quantized=k_scales is not None,
    )
    # (batch, q_len, heads, d) -> (batch, kv_heads, rows, d): a K/V group's queries as rows.
    q_rows = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = jnp.pad(q_rows.reshape(batch, kv_heads, rows, head_dim), ((0, 0), (0, 0), (0, padded - rows), (0, 0)))

    # Index maps take (batch row, logical block) and then the prefetched refs.
    row_spec = pl.BlockSpec((_SQ, kv_heads, padded, head_dim), lambda b, j, *_: (b, 0, 0, 0))
    pool_spec = pl.BlockSpec((_SQ, block_size, kv_heads, head_dim), lambda b, j, *s: (t.physical(b, j, *s), 0, 0, 0))
    in_specs, args = [row_spec, pool_spec, pool_spec], [q_rows, k_pages, v_pages]
    if t.quantized:
        # (num_blocks, kv_heads) -> (num_blocks, 1, kv_heads): a block's scales as one full-width row.
        scale_spec = pl.BlockSpec((_SQ, 1, kv_heads), lambda b, j, *s: (t.physical(b, j, *s), 0, 0))
        in_specs += [scale_spec, scale_spec]
        args += [x.astype(jnp.float32).reshape(num_blocks, 1, kv_heads) for x in (k_scales, v_scales)]
    out = pl.pallas_call(
        functools.partial(_kernel, t=t),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, max_blocks),
            in_specs=in_specs,
            out_specs=row_spec,
            scratch_shapes=[
                pltpu.VMEM((kv_heads, padded, LANES), jnp.float32),
                pltpu.VMEM((kv_heads, padded, LANES), jnp.float32),
                pltpu.VMEM((kv_heads, padded, head_dim), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        compiler_params=tpu_params((_PARALLEL, _ARBITRARY)),
        interpret=tpu_interpret(interpret),
        name="paged_attention_tpu",
    )(
        block_tables.astype(jnp.int32).reshape(-1),
        lengths.astype(jnp.int32),
        q_offset.astype(jnp.int32),
        *args,
    )
    out = out[:, :, :rows].reshape(batch, kv_heads, q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)


_attend = with_reference_gradient(_forward)


def paged_attention_tpu(
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
    """The ``pallas_tpu`` backend: ``paged_attention_reference``'s contract, as one Mosaic kernel.

    q (batch, q_len, heads, head_dim); k_pages, v_pages (num_blocks, block_size, kv_heads,
    head_dim) in q's dtype, or int8 with ``k_scales``/``v_scales`` (num_blocks, kv_heads);
    block_tables (batch, max_blocks); lengths and q_offset (batch,) ints. Output in q's dtype.
    ``interpret=True`` runs the kernel in the TPU interpreter (CPU).
    """
    if (k_scales is None) != (v_scales is None):
        raise ValueError("paged_attention_tpu: pass k_scales and v_scales together (int8 pools) or neither")
    return _attend(
        q, k_pages, v_pages, block_tables, lengths, q_offset, k_scales, v_scales, sm_scale, window, interpret
    )


def check(
    *, dtype, head_dim: int, q_len: int, heads: int, kv_heads: int, block_size: int, pages_dtype=None, **_
) -> str | None:
    """Why the TPU kernel cannot serve these arguments, or None.

    Any head_dim and kv_heads: a step's block spans the pool's full (kv_heads, head_dim).
    """
    del head_dim, kv_heads
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(jnp.float16):
        return "TPUs have no float16 arithmetic; cast q and the pools to bfloat16 (or pass implementation='xla')"
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"the TPU kernel takes float32 or bfloat16, not {dtype.name}"
    if pages_dtype is not None and jnp.dtype(pages_dtype) not in (dtype, jnp.dtype(jnp.int8)):
        return f"the TPU kernel reads pools in q's dtype or int8, not {jnp.dtype(pages_dtype).name}"
    if block_size % SUBLANES:
        return (
            f"the TPU kernel attends over each head's (block_size, head_dim) slice of a block and needs "
            f"block_size a multiple of {SUBLANES} sublanes, got {block_size}"
        )
    if q_len * heads > MAX_QUERY_ROWS:
        return (
            f"the TPU kernel holds all q_len * heads = {q_len * heads} query rows of a batch row in VMEM, "
            f"at most {MAX_QUERY_ROWS} (decode steps and short chunks)"
        )
    return None


BACKEND = Backend("pallas_tpu", ("tpu",), paged_attention_tpu, check, interpretable=True)
