"""Flash attention as Pallas TPU (Mosaic) kernels, registered as the ``pallas_tpu`` backend.

The wrapper moves heads ahead of the sequence, (B, S, H, D) -> (B, H, S, D), pads the sequences
to whole blocks and head_dim to the 128-lane width, and slices the results back. The forward
walks key blocks innermost and keeps the online-softmax state in VMEM scratch; the backward
recomputes probabilities from the log-sum-exp in a dK/dV kernel (query blocks of the whole
head group innermost, so grouped-query gradients are summed in the kernel) and a dQ kernel.
Tiles that causal, sliding-window or key-value-length masks hide entirely do no work and fetch no
new block: both decisions come from ``block_visible`` and ``kv_block_index``/``q_block_index``.
Per-row query offsets and key-value lengths, when given, are prefetched into SMEM
(``PrefetchScalarGridSpec``), where the index maps and kernels read them; without them the
kernels use a plain grid. On CPU the kernels run in the TPU interpreter.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mlsys_jax.kernels.attention.options import AttentionBlocks, AttentionOptions
from mlsys_jax.kernels.attention.reference import visible
from mlsys_jax.kernels.attention.vjp import pallas_backend
from mlsys_jax.kernels.lowering import tpu_interpret, tpu_params

__all__ = [
    "BACKEND",
    "DEFAULTS",
    "backward",
    "block_visible",
    "candidates",
    "check",
    "forward",
    "kv_block_index",
    "kv_block_range",
    "q_block_index",
    "q_block_range",
]

LANES = 128  # the minor (lane) width of a TPU vreg: last block dims are multiples of it
SUBLANES = 8  # the second-minor (sublane) width
_SQ = getattr(pl, "squeezed", None)  # a block dim of 1 dropped from the kernel's view
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# --- which tiles hold a visible entry -----------------------------------------------------------
#
# Causal and sliding-window masks depend only on d = query - key. A tile spans a contiguous range
# of d, so it holds a visible entry exactly when that range meets the allowed one. Query i of a
# row sits at position q_offset + i, and a key-value length cuts the tile's keys at kv_len - 1.
# The functions below take Python ints or traced int32 scalars (grid indices and prefetched
# per-row scalars inside kernels and index maps); None for q_offset or kv_len means absent.


def _allowed_offsets(causal: bool, window: int | None) -> tuple[int | None, int | None]:
    """Bounds (lo, hi) of the visible d = q - k, None where unbounded."""
    lo = 0 if causal else (None if window is None else 1 - window)
    hi = None if window is None else window - 1
    return lo, hi


def _shift(pos, offset):
    """pos + offset, or pos untouched when there is no offset (the plain program stays as is)."""
    return pos if offset is None else pos + offset


def _last_key(k0, block_k: int, kv_len):
    """The last key of the tile starting at key k0 that a length leaves visible."""
    last = k0 + block_k - 1
    return last if kv_len is None else jnp.minimum(last, kv_len - 1)


def block_visible(
    q_block, k_block, *, block_q: int, block_k: int, causal: bool, window: int | None, q_offset=None, kv_len=None
):
    """Whether tile (q_block, k_block) holds a (query, key) pair visible under the causal, window
    and length masks, queries shifted by ``q_offset``; segment ids and padding are not
    considered. A Python True when nothing masks."""
    lo, hi = _allowed_offsets(causal, window)
    q0, k0 = _shift(q_block * block_q, q_offset), k_block * block_k
    ok = True
    if kv_len is not None:  # the tile starts before the first hidden key
        ok = ok & (k0 < kv_len)
    if lo is not None:  # the largest d in the tile reaches lo
        ok = ok & (q0 + block_q - 1 - k0 >= lo)
    if hi is not None:  # the smallest d in the tile stays under hi
        ok = ok & (q0 - _last_key(k0, block_k, kv_len) <= hi)
    return ok


def kv_block_range(
    q_block,
    *,
    block_q: int,
    block_k: int,
    num_k_blocks: int,
    causal: bool,
    window: int | None,
    q_offset=None,
    kv_len=None,
):
    """(first, last) key block that query block ``q_block`` can see, clipped to the grid."""
    lo, hi = _allowed_offsets(causal, window)
    q0 = _shift(q_block * block_q, q_offset)
    first = 0 if hi is None else _div(jnp.maximum(q0 - hi, 0), block_k)
    last = num_k_blocks - 1 if lo is None else _div(q0 + block_q - 1 - lo, block_k)
    if kv_len is not None:
        last = jnp.minimum(last, _div(kv_len - 1, block_k))
    return _clip(first, num_k_blocks), _clip(last, num_k_blocks)


def q_block_range(
    k_block,
    *,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    causal: bool,
    window: int | None,
    q_offset=None,
    kv_len=None,
):
    """(first, last) query block that can see key block ``k_block``, clipped to the grid; one
    block when a length hides the whole key block."""
    lo, hi = _allowed_offsets(causal, window)
    neg = None if q_offset is None else -q_offset  # query positions -> query indices
    k0 = k_block * block_k
    first = 0 if lo is None else _div(jnp.maximum(_shift(k0 + lo, neg), 0), block_q)
    last = num_q_blocks - 1 if hi is None else _div(_shift(_last_key(k0, block_k, kv_len) + hi, neg), block_q)
    if kv_len is not None:
        last = jnp.where(k0 < kv_len, last, first)
    return _clip(first, num_q_blocks), _clip(last, num_q_blocks)


def _div(a, b: int):
    """a // b as plain integer division (cheap in Mosaic's scalar unit). It rounds toward zero,
    which differs from floor only for negative a, where both give a block the callers clip to 0."""
    return jax.lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _clip(i, n: int):
    return jnp.minimum(jnp.maximum(i, 0), n - 1)


def kv_block_index(
    q_block,
    k_step,
    *,
    block_q: int,
    block_k: int,
    num_k_blocks: int,
    causal: bool,
    window: int | None,
    q_offset=None,
    kv_len=None,
):
    """The key block the K/V index map fetches at grid step ``k_step`` of query block
    ``q_block``: ``k_step`` moved into the visible range, so skipped steps repeat a neighbour's
    block, which the pipeline does not fetch again."""
    first, last = kv_block_range(
        q_block,
        block_q=block_q,
        block_k=block_k,
        num_k_blocks=num_k_blocks,
        causal=causal,
        window=window,
        q_offset=q_offset,
        kv_len=kv_len,
    )
    return _clip(jnp.minimum(jnp.maximum(k_step, first), last), num_k_blocks)


def q_block_index(
    k_block,
    q_step,
    *,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    causal: bool,
    window: int | None,
    q_offset=None,
    kv_len=None,
):
    """The query block the Q/dO index maps of the dK/dV kernel fetch at step ``q_step`` of key
    block ``k_block`` (see ``kv_block_index``)."""
    first, last = q_block_range(
        k_block,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
        causal=causal,
        window=window,
        q_offset=q_offset,
        kv_len=kv_len,
    )
    return _clip(jnp.minimum(jnp.maximum(q_step, first), last), num_q_blocks)


# --- static description of one call ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static shape and mask facts the kernels close over."""

    causal: bool
    window: int | None
    segments: bool
    sm_scale: float
    seq_k: int  # real keys; the rest of the padded key axis is masked
    block_q: int
    block_k: int
    num_q_blocks: int
    num_k_blocks: int
    padded_keys: bool
    offsets: bool = False  # per-row query offsets arrive as a prefetched scalar
    lengths: bool = False  # per-row key-value lengths arrive as a prefetched scalar

    @property
    def masked(self) -> bool:
        return self.causal or self.window is not None or self.segments or self.padded_keys or self.lengths

    @property
    def num_scalars(self) -> int:
        """How many (B,) int32 arrays are prefetched into SMEM: offsets, then lengths."""
        return int(self.offsets) + int(self.lengths)

    def row(self, bi, scalars) -> tuple:
        """(q_offset, kv_len) of batch row ``bi`` read from the prefetched SMEM refs (None for
        each one absent), as the mask and index functions take them."""
        refs = iter(scalars)
        q_offset = next(refs)[bi] if self.offsets else None
        kv_len = next(refs)[bi] if self.lengths else None
        return q_offset, kv_len

    def visible(self, q_block, k_block, row=(None, None)):
        return block_visible(
            q_block,
            k_block,
            block_q=self.block_q,
            block_k=self.block_k,
            causal=self.causal,
            window=self.window,
            q_offset=row[0],
            kv_len=row[1],
        )

    def k_index(self, q_block, k_step, row=(None, None)):
        return kv_block_index(
            q_block,
            k_step,
            block_q=self.block_q,
            block_k=self.block_k,
            num_k_blocks=self.num_k_blocks,
            causal=self.causal,
            window=self.window,
            q_offset=row[0],
            kv_len=row[1],
        )

    def q_index(self, k_block, q_step, row=(None, None)):
        return q_block_index(
            k_block,
            q_step,
            block_q=self.block_q,
            block_k=self.block_k,
            num_q_blocks=self.num_q_blocks,
            causal=self.causal,
            window=self.window,
            q_offset=row[0],
            kv_len=row[1],
        )

    def mask(self, q_block, k_block, shape, q_axis, q_seg=None, kv_seg=None, row=(None, None)):
        """Visibility of a (block_q, block_k) tile, or its transpose when ``q_axis`` is 1."""
        q0 = _shift(q_block * self.block_q, row[0])
        q_pos = q0 + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_block * self.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
        ok = visible(q_pos, k_pos, causal=self.causal, window=self.window, q_seg=q_seg, kv_seg=kv_seg, kv_len=row[1])
        if self.padded_keys:
            ok = ok & (k_pos < self.seq_k)
        return ok


def _block(name: str, block: int, n: int, interpret: bool) -> int:
    """The block size actually used: ``block`` capped at the (aligned) sequence length."""
    align = SUBLANES if interpret else LANES
    if block % align:
        where = "in the TPU interpreter" if interpret else "on TPU, where it is a lane dimension"
        raise ValueError(
            f"pallas_tpu: AttentionBlocks.{name}={block} must be a multiple of {align} {where}. "
            f"Fix: pick a multiple of {align}, e.g. {max(align, block // align * align)}."
        )
    return min(block, _round_up(n, align))


def _tiling(
    opts: AttentionOptions,
    segments: bool,
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    q_offset: jax.Array | None,
    kv_lengths: jax.Array | None,
) -> _Tiling:
    padded_q, padded_k = _round_up(seq_q, block_q), _round_up(seq_k, block_k)
    return _Tiling(
        causal=opts.causal,
        window=opts.window,
        segments=segments,
        sm_scale=float(opts.sm_scale),
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=padded_q // block_q,
        num_k_blocks=padded_k // block_k,
        padded_keys=padded_k != seq_k,
        offsets=q_offset is not None,
        lengths=kv_lengths is not None,
    )


def _scalars(q_offset: jax.Array | None, kv_lengths: jax.Array | None) -> list[jax.Array]:
    """The per-row scalars to prefetch, in ``_Tiling.row``'s order."""
    return [x.astype(jnp.int32) for x in (q_offset, kv_lengths) if x is not None]


def _grid(t: _Tiling, grid, in_specs, out_specs, scratch_shapes) -> dict:
    """``pallas_call``'s grid arguments. With per-row offsets or lengths they are prefetched into
    SMEM, and index maps and kernels take their refs after the grid indices / before the blocks;
    without them the call is a plain grid."""
    if not t.num_scalars:
        return {"grid": grid, "in_specs": in_specs, "out_specs": out_specs, "scratch_shapes": scratch_shapes}
    return {
        "grid_spec": pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=t.num_scalars,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch_shapes,
        )
    }


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """A lane-replicated (rows, 128) tile as (rows, n): tiled when n is a multiple of 128 (always
    on TPU), cut when smaller (interpreter only)."""
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return jnp.tile(x, (1, -(-n // LANES)))[:, :n]


def _heads_major(x: jax.Array, seq: int, head_dim: int) -> jax.Array:
    """(B, S, H, D) -> (B, H, seq, head_dim), zero-padded."""
    _, s, _, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, seq - s), (0, 0), (0, head_dim - d)))
    return jnp.transpose(x, (0, 2, 1, 3))


def _seq_major(x: jax.Array, seq: int, head_dim: int) -> jax.Array:
    """(B, H, S', D') -> (B, seq, H, head_dim), dropping the padding."""
    return jnp.transpose(x[:, :, :seq, :head_dim], (0, 2, 1, 3))


def _seg_column(seg: jax.Array, seq: int) -> jax.Array:
    """(B, S) ids -> (B, seq, 128): one id per sublane row, repeated across lanes."""
    seg = jnp.pad(seg, ((0, 0), (0, seq - seg.shape[1])))
    return jnp.broadcast_to(seg[:, :, None], (*seg.shape, LANES))


def _seg_row(seg: jax.Array, seq: int) -> jax.Array:
    """(B, S) ids -> (B, 1, seq): lane-dense."""
    return jnp.pad(seg, ((0, 0), (0, seq - seg.shape[1])))[:, None, :]


# --- forward ------------------------------------------------------------------------------------


def _forward_kernel(*refs, t: _Tiling):
    row, refs = t.row(pl.program_id(0), refs[: t.num_scalars]), refs[t.num_scalars :]
    if t.segments:
        q_seg_ref, kv_seg_ref, *refs = refs
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(t.visible(qi, ki, row))  # then ki is also the block the K/V index map fetched
    def _step():
        kb = ki
        v = v_ref[...]
        s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
        s = s * t.sm_scale
        if t.masked:
            segs = (_lanes(q_seg_ref[...], t.block_k), kv_seg_ref[...]) if t.segments else (None, None)
            s = jnp.where(t.mask(qi, kb, s.shape, 0, *segs, row=row), s, -jnp.inf)
        m_prev = m_sc[...]  # (block_q, 128): the row max repeated across lanes
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows with nothing visible yet
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - _lanes(m_safe, t.block_k))
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = jax.lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _lanes(alpha, acc_sc.shape[1]) + pv

    @pl.when(ki == t.num_k_blocks - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] * _lanes(1.0 / l_safe, acc_sc.shape[1])).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(l_safe))


@functools.partial(jax.jit, static_argnums=(7,))
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
    """Attention output (B, S, H, D) in q's dtype and log-sum-exp (B, H, S) in fp32.

    Jitted per ``opts``, so eager calls compile the kernel once per configuration.
    """
    b, s, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    t = _tiling(
        opts,
        q_seg is not None,
        s,
        tk,
        _block("block_q", opts.blocks.block_q, s, opts.interpret),
        _block("block_k", opts.blocks.block_k, tk, opts.interpret),
        q_offset,
        kv_lengths,
    )
    bq, bk, nq, nk = t.block_q, t.block_k, t.num_q_blocks, t.num_k_blocks
    dp = _round_up(d, LANES)
    qt = _heads_major(q, nq * bq, dp)
    kt, vt = _heads_major(k, nk * bk, dp), _heads_major(v, nk * bk, dp)

    # Index maps take (batch, head, q block, k step) and then the prefetched refs, if any.
    def k_map(bi, hi, qi, ki, *s):
        return bi, _div(hi, group), t.k_index(qi, ki, t.row(bi, s)), 0

    q_spec = pl.BlockSpec((_SQ, _SQ, bq, dp), lambda bi, hi, qi, ki, *_: (bi, hi, qi, 0))
    kv_spec = pl.BlockSpec((_SQ, _SQ, bk, dp), k_map)
    in_specs, args = [q_spec, kv_spec, kv_spec], [qt, kt, vt]
    if t.segments:
        in_specs = [
            pl.BlockSpec((_SQ, bq, LANES), lambda bi, hi, qi, ki, *_: (bi, qi, 0)),
            pl.BlockSpec((_SQ, 1, bk), lambda *i: (i[0], 0, k_map(*i)[2])),
            *in_specs,
        ]
        assert q_seg is not None and kv_seg is not None
        args = [_seg_column(q_seg, nq * bq), _seg_row(kv_seg, nk * bk), *args]

    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, t=t),
        **_grid(
            t,
            (b, h, nq, nk),
            in_specs,
            [q_spec, pl.BlockSpec((_SQ, _SQ, bq, LANES), lambda bi, hi, qi, ki, *_: (bi, hi, qi, 0))],
            [
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, dp), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((b, h, nq * bq, LANES), jnp.float32)],
        compiler_params=tpu_params((_PARALLEL,) * 3 + (_ARBITRARY,)),
        interpret=tpu_interpret(opts.interpret),
        name="flash_attention_tpu_fwd",
    )(*_scalars(q_offset, kv_lengths), *args)
    return _seq_major(o, s, d), lse[:, :, :s, 0]


# --- backward -----------------------------------------------------------------------------------


def _dkv_kernel(*refs, t: _Tiling, group: int):
    row, refs = t.row(pl.program_id(0), refs[: t.num_scalars]), refs[t.num_scalars :]
    if t.segments:
        q_seg_ref, kv_seg_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    kb, g, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(t.visible(qi, kb, row))  # then qi is also the block the Q/dO index maps fetched
    def _step():
        qb = qi
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        # Transposed tiles (block_k, block_q): per-query lse and delta are lane-dense rows.
        st = jax.lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * t.sm_scale
        if t.masked:
            segs = (q_seg_ref[...], _lanes(kv_seg_ref[...], t.block_q)) if t.segments else (None, None)
            st = jnp.where(t.mask(qb, kb, st.shape, 1, *segs, row=row), st, -jnp.inf)
        pt = jnp.exp(st - lse_ref[...])  # lse = +inf (no visible key, or padding) gives 0
        dv_sc[...] += jax.lax.dot_general(pt.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
        dpt = jax.lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[...])
        dk_sc[...] += jax.lax.dot_general(dst.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

    @pl.when((g == group - 1) & (qi == t.num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * t.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, t: _Tiling):
    row, refs = t.row(pl.program_id(0), refs[: t.num_scalars]), refs[t.num_scalars :]
    if t.segments:
        q_seg_ref, kv_seg_ref, *refs = refs
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = refs
    qi, ki = pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(t.visible(qi, ki, row))  # then ki is also the block the K/V index map fetched
    def _step():
        kb = ki
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * t.sm_scale
        if t.masked:
            segs = (_lanes(q_seg_ref[...], t.block_k), kv_seg_ref[...]) if t.segments else (None, None)
            s = jnp.where(t.mask(qi, kb, s.shape, 0, *segs, row=row), s, -jnp.inf)
        lse = jnp.expand_dims(lse_ref[0], -1)  # lane-dense row -> (block_q, 1) column
        delta = jnp.expand_dims(delta_ref[0], -1)
        p = jnp.exp(s - lse)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

    @pl.when(ki == t.num_k_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * t.sm_scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnums=(10,))
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
    """Gradients (dq, dk, dv) in the input dtypes, recomputing probabilities from ``lse``."""
    b, s, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    t = _tiling(
        opts,
        q_seg is not None,
        s,
        tk,
        _block("block_q_bwd", opts.blocks.block_q_bwd, s, opts.interpret),
        _block("block_k_bwd", opts.blocks.block_k_bwd, tk, opts.interpret),
        q_offset,
        kv_lengths,
    )
    bq, bk, nq, nk = t.block_q, t.block_k, t.num_q_blocks, t.num_k_blocks
    sp, tp, dp = nq * bq, nk * bk, _round_up(d, LANES)

    delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), o.astype(jnp.float32))
    # Padded query rows get lse = +inf and delta = 0, so they add nothing to dK/dV.
    lse_row = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, sp - s)), constant_values=jnp.inf)[:, :, None, :]
    delta_row = jnp.pad(delta, ((0, 0), (0, 0), (0, sp - s)))[:, :, None, :]
    qt, do_t = _heads_major(q, sp, dp), _heads_major(do, sp, dp)
    kt, vt = _heads_major(k, tp, dp), _heads_major(v, tp, dp)
    interpret = tpu_interpret(opts.interpret)
    scalars = _scalars(q_offset, kv_lengths)

    # dK, dV: grid (batch, kv_heads, k_blocks, group_heads, q_blocks), then prefetched refs.
    def q_map(bi, ki, kb, g, qi, *s):
        return bi, ki * group + g, t.q_index(kb, qi, t.row(bi, s)), 0

    def row_map(*i):
        bi, hi, qb, _ = q_map(*i)
        return bi, hi, 0, qb

    kv_spec = pl.BlockSpec((_SQ, _SQ, bk, dp), lambda bi, ki, kb, g, qi, *_: (bi, ki, kb, 0))
    q_spec = pl.BlockSpec((_SQ, _SQ, bq, dp), q_map)
    row_spec = pl.BlockSpec((_SQ, _SQ, 1, bq), row_map)
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qt, kt, vt, do_t, lse_row, delta_row]
    if t.segments:
        in_specs = [
            pl.BlockSpec((_SQ, 1, bq), lambda *i: (i[0], 0, q_map(*i)[2])),
            pl.BlockSpec((_SQ, bk, LANES), lambda bi, ki, kb, g, qi, *_: (bi, kb, 0)),
            *in_specs,
        ]
        assert q_seg is not None and kv_seg is not None
        args = [_seg_row(q_seg, sp), _seg_column(kv_seg, tp), *args]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t, group=group),
        **_grid(
            t,
            (b, kvh, nk, group, nq),
            in_specs,
            [kv_spec, kv_spec],
            [pltpu.VMEM((bk, dp), jnp.float32), pltpu.VMEM((bk, dp), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=tpu_params((_PARALLEL,) * 3 + (_ARBITRARY,) * 2),
        interpret=interpret,
        name="flash_attention_tpu_dkv",
    )(*scalars, *args)

    # dQ: grid (batch, heads, q_blocks, k_blocks), then prefetched refs.
    def k_map(bi, hi, qi, ki, *s):
        return bi, _div(hi, group), t.k_index(qi, ki, t.row(bi, s)), 0

    q_spec = pl.BlockSpec((_SQ, _SQ, bq, dp), lambda bi, hi, qi, ki, *_: (bi, hi, qi, 0))
    kv_spec = pl.BlockSpec((_SQ, _SQ, bk, dp), k_map)
    row_spec = pl.BlockSpec((_SQ, _SQ, 1, bq), lambda bi, hi, qi, ki, *_: (bi, hi, 0, qi))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    args = [qt, kt, vt, do_t, lse_row, delta_row]
    if t.segments:
        in_specs = [
            pl.BlockSpec((_SQ, bq, LANES), lambda bi, hi, qi, ki, *_: (bi, qi, 0)),
            pl.BlockSpec((_SQ, 1, bk), lambda *i: (i[0], 0, k_map(*i)[2])),
            *in_specs,
        ]
        assert q_seg is not None and kv_seg is not None
        args = [_seg_column(q_seg, sp), _seg_row(kv_seg, tp), *args]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, t=t),
        **_grid(t, (b, h, nq, nk), in_specs, q_spec, [pltpu.VMEM((bq, dp), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=tpu_params((_PARALLEL,) * 3 + (_ARBITRARY,)),
        interpret=interpret,
        name="flash_attention_tpu_dq",
    )(*scalars, *args)
    return _seq_major(dq, s, d), _seq_major(dk, tk, d), _seq_major(dv, tk, d)


# --- what the backend serves --------------------------------------------------------------------


def check(
    *,
    dtype,
    head_dim,
    seq_q,
    seq_k,
    heads,
    kv_heads,
    causal,
    segments,
    window,
    offsets: bool = False,
    lengths: bool = False,
    **_,
) -> str | None:
    """Why ``pallas_tpu`` cannot serve these arguments, or None.

    head_dim of any size is zero-padded to a multiple of 128 lanes, sequences to whole blocks,
    and per-row query offsets and key-value lengths are prefetched scalars, so only the dtype
    limits it: float16 is rejected, not upcast (TPUs compute in bf16).
    """
    del head_dim, seq_q, seq_k, heads, kv_heads, causal, segments, window, offsets, lengths
    dtype = jnp.dtype(dtype)
    if dtype == jnp.dtype(jnp.float16):
        return "TPUs have no float16 arithmetic; cast q, k, v to bfloat16 (or pass implementation='xla')"
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"the TPU kernel takes float32 or bfloat16, not {dtype.name}"
    return None


# --- block sizes and the backend ----------------------------------------------------------------

#: Default tiles per device kind; "cpu" is the TPU interpreter (blocks a multiple of 8 there).
DEFAULTS = {
    "TPU": AttentionBlocks(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256),
    "cpu": AttentionBlocks(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32),
}


def candidates(platform: str) -> list[AttentionBlocks]:
    """Tiles autotuning tries: 256-1024 (multiples of the 128 lanes) on a TPU, two small sizes
    interpreted."""
    sizes = (256, 512, 1024) if platform == "tpu" else (16, 32)
    return [AttentionBlocks(bq, bk, bq, bk) for bq in sizes for bk in sizes]


BACKEND = pallas_backend("pallas_tpu", ("tpu",), forward, backward, check, DEFAULTS, candidates)
