"""Pallas kernels of the fused linear cross-entropy: the two chunked primitives, per platform.

``*_stats(h, w, labels)`` returns each token's log-sum-exp over this vocabulary shard and its
label's logit (0 when the label is not in the shard); ``*_grads(h, w, labels, lse, coef, g_label)``
returns (dh, dw) for dlogits = softmax(logits) * coef - onehot(label) * g_label, recomputing each
(tokens x vocab) tile of logits from h and w so that no whole logits array ever exists.
``cross_entropy.py`` turns these into a differentiable, vocab-parallel loss.

Inputs are padded here to whole blocks (tokens with label -1 and zero weight in the backward,
vocabulary columns masked to -inf); a padding copy happens only for ragged shapes.

- Triton (GPU): a program per token block loops over vocabulary blocks (stats); the backward is
  two kernels without atomics, dh (a program per token block x feature block, looping over the
  vocabulary) and dw (a program per vocabulary block x feature block, looping over tokens).
  Every tile is a power of two and the feature dim is walked in ``block_d`` chunks, so no tile
  holds a whole hidden row; each logits tile is fp32-accumulated.
- TPU (Mosaic): the loops are grid axes marked "arbitrary" with fp32 VMEM accumulators; tiles
  hold a whole feature row ((block_tokens, D) and (D, block_vocab)).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlsys_jax.kernels.lowering import tpu_interpret, tpu_params, triton_params

__all__ = ["triton_stats", "triton_grads", "tpu_stats", "tpu_grads", "triton_block_d",
           "MIN_BLOCK_TOKENS", "MIN_BLOCK_VOCAB"]

#: Smallest tiles: Triton's dot wants every dim >= 16; TPU wants vocab (lanes) in 128s.
MIN_BLOCK_TOKENS = 16
MIN_BLOCK_VOCAB = {"triton": 16, "tpu": 128}
#: Feature chunk of the Triton kernels (a power of two; D is padded to a multiple of it).
MAX_BLOCK_D = 64
NEG_INF = float("-inf")


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tile(requested: int, size: int, minimum: int) -> int:
    """The block actually used: the requested one, shrunk for small problems, never below min."""
    return max(minimum, min(requested, _pow2_at_least(size)))


def triton_block_d(d: int) -> int:
    """Feature chunk of the Triton kernels for hidden size ``d``."""
    return max(16, min(MAX_BLOCK_D, _pow2_at_least(d)))


def _pad_to(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def varying_axes(x: Any) -> frozenset:
    """The mesh axes ``x`` varies over inside shard_map (jax 0.10 keeps them in ``aval.mat``,
    older releases in ``aval.vma``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _out(shape: tuple[int, ...], dtype: Any, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output shape that varies over the same mesh axes as ``like`` (which shard_map's
    check_vma asks of every pallas_call output)."""
    aval = jax.typeof(like)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        try:
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        except TypeError:
            pass
    vma = getattr(aval, "vma", None)
    if vma is not None:
        try:
            return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
        except TypeError:
            pass
    return jax.ShapeDtypeStruct(shape, dtype)


# --- tile math shared by every kernel -----------------------------------------------------------

def _mask_columns(logits: jax.Array, col0: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """Column ids of a (tokens, vocab) tile starting at ``col0``, and the tile with padded
    columns (id >= vocab) set to -inf."""
    cols = col0 + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return cols, jnp.where(cols < vocab, logits, NEG_INF)


def _dlogits(logits, cols, labels, lse, coef, g_label):
    """softmax(logits) * coef - onehot(label) * g_label on one tile (padded columns give 0)."""
    p = jnp.exp(logits - lse[:, None])
    return p * coef[:, None] - jnp.where(cols == labels[:, None], g_label[:, None], 0.0)


def _dot(a, b, contract: tuple[int, int]) -> jax.Array:
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32)


# --- Triton ------------------------------------------------------------------------------------

def _triton_logits(h_ref, w_ref, rows, col0, bv: int, bd: int, nd: int, bt: int) -> jax.Array:
    """fp32 logits of token rows ``rows`` (a slice of h_ref) and columns col0:col0+bv, summed
    over feature chunks of ``bd``."""
    def body(k, acc):
        d0 = pl.multiple_of(k * bd, bd)
        hk = h_ref[rows, pl.ds(d0, bd)]
        wk = w_ref[pl.ds(d0, bd), pl.ds(col0, bv)]
        return acc + _dot(hk, wk, (1, 0))
    return lax.fori_loop(0, nd, body, jnp.zeros((bt, bv), jnp.float32))


def _triton_stats_kernel(h_ref, w_ref, lab_ref, lse_ref, ll_ref, *, vocab, bt, bv, bd, nv, nd):
    labels = lab_ref[...]

    def body(j, carry):
        m, s, ll = carry
        col0 = pl.multiple_of(j * bv, bv)
        raw = _triton_logits(h_ref, w_ref, slice(None), col0, bv, bd, nd, bt)
        cols, logits = _mask_columns(raw, col0, vocab)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        ll = ll + jnp.sum(jnp.where(cols == labels[:, None], logits, 0.0), axis=1)
        return m_new, s, ll

    init = (jnp.full((bt,), NEG_INF, jnp.float32), jnp.zeros((bt,), jnp.float32),
            jnp.zeros((bt,), jnp.float32))
    m, s, ll = lax.fori_loop(0, nv, body, init)
    lse_ref[...] = m + jnp.log(s)
    ll_ref[...] = ll


def _triton_dh_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dh_ref, *,
                      vocab, bt, bv, bd, nv, nd):
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)
    labels, lse, coef, gl = lab_ref[...], lse_ref[...], coef_ref[...], gl_ref[...]

    def body(j, acc):
        col0 = pl.multiple_of(j * bv, bv)
        raw = _triton_logits(h_ref, w_ref, slice(None), col0, bv, bd, nd, bt)
        cols, logits = _mask_columns(raw, col0, vocab)
        dl = _dlogits(logits, cols, labels, lse, coef, gl)
        wk = w_ref[pl.ds(d0, bd), pl.ds(col0, bv)]
        return acc + _dot(dl.astype(wk.dtype), wk, (1, 1))

    acc = lax.fori_loop(0, nv, body, jnp.zeros((bt, bd), jnp.float32))
    dh_ref[...] = acc.astype(dh_ref.dtype)


def _triton_dw_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dw_ref, *,
                      vocab, bt, bv, bd, nt, nd):
    col0 = pl.multiple_of(pl.program_id(0) * bv, bv)
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)

    def body(i, acc):
        rows = pl.ds(pl.multiple_of(i * bt, bt), bt)
        raw = _triton_logits(h_ref, w_ref, rows, 0, bv, bd, nd, bt)
        cols, logits = _mask_columns(raw, col0, vocab)
        dl = _dlogits(logits, cols, lab_ref[rows], lse_ref[rows], coef_ref[rows], gl_ref[rows])
        hk = h_ref[rows, pl.ds(d0, bd)]
        return acc + _dot(hk, dl.astype(hk.dtype), (0, 0))

    acc = lax.fori_loop(0, nt, body, jnp.zeros((bd, bv), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _triton_layout(h, w, labels, block_tokens, block_vocab):
    n, d = h.shape
    vocab = w.shape[1]
    bt = _tile(block_tokens, n, MIN_BLOCK_TOKENS)
    bv = _tile(block_vocab, vocab, MIN_BLOCK_VOCAB["triton"])
    bd = triton_block_d(d)
    np_, vp, dp = _round_up(n, bt), _round_up(vocab, bv), _round_up(d, bd)
    hp = _pad_to(_pad_to(h, 0, np_), 1, dp)
    wp = _pad_to(_pad_to(w, 0, dp), 1, vp)
    lp = _pad_to(labels.astype(jnp.int32), 0, np_, -1)
    return hp, wp, lp, dict(vocab=vocab, bt=bt, bv=bv, bd=bd, nt=np_ // bt, nv=vp // bv, nd=dp // bd)


def triton_stats(h, w, labels, *, block_tokens: int, block_vocab: int, num_warps: int = 4,
                 num_stages: int = 2, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(lse, label_logit), each (tokens,) fp32, of h (tokens, D) @ w (D, V) on Triton."""
    n = h.shape[0]
    hp, wp, lp, g = _triton_layout(h, w, labels, block_tokens, block_vocab)
    bt, np_ = g["bt"], g["nt"] * g["bt"]
    kernel = functools.partial(_triton_stats_kernel, vocab=g["vocab"], bt=bt, bv=g["bv"],
                               bd=g["bd"], nv=g["nv"], nd=g["nd"])
    lse, ll = pl.pallas_call(
        kernel,
        out_shape=(_out((np_,), jnp.float32, hp),) * 2,
        grid=(g["nt"],),
        in_specs=[pl.BlockSpec((bt, hp.shape[1]), lambda i: (i, 0)),
                  pl.BlockSpec(wp.shape, lambda i: (0, 0)),
                  pl.BlockSpec((bt,), lambda i: (i,))],
        out_specs=(pl.BlockSpec((bt,), lambda i: (i,)),) * 2,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="linear_cross_entropy_stats",
    )(hp, wp, lp)
    return lse[:n], ll[:n]


def triton_grads(h, w, labels, lse, coef, g_label, *, block_tokens: int, block_vocab: int,
                 num_warps: int = 4, num_stages: int = 2, interpret: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """(dh, dw) in h's and w's dtypes, by two Triton kernels (no atomics)."""
    n, d = h.shape
    vocab = w.shape[1]
    hp, wp, lp, g = _triton_layout(h, w, labels, block_tokens, block_vocab)
    bt, bv, bd, np_ = g["bt"], g["bv"], g["bd"], g["nt"] * g["bt"]
    # Padded tokens get coef = g_label = 0, so they add nothing to dw.
    rows = [_pad_to(x.astype(jnp.float32), 0, np_) for x in (lse, coef, g_label)]
    params = triton_params(num_warps, num_stages)
    dh_kernel = functools.partial(_triton_dh_kernel, vocab=vocab, bt=bt, bv=bv, bd=bd,
                                  nv=g["nv"], nd=g["nd"])
    row_block = pl.BlockSpec((bt,), lambda i, k: (i,))
    dh = pl.pallas_call(
        dh_kernel,
        out_shape=_out(hp.shape, h.dtype, hp),
        grid=(g["nt"], g["nd"]),
        in_specs=[pl.BlockSpec((bt, hp.shape[1]), lambda i, k: (i, 0)),
                  pl.BlockSpec(wp.shape, lambda i, k: (0, 0)),
                  row_block, row_block, row_block, row_block],
        out_specs=pl.BlockSpec((bt, bd), lambda i, k: (i, k)),
        compiler_params=params, interpret=interpret, name="linear_cross_entropy_dh",
    )(hp, wp, lp, *rows)
    dw_kernel = functools.partial(_triton_dw_kernel, vocab=vocab, bt=bt, bv=bv, bd=bd,
                                  nt=g["nt"], nd=g["nd"])
    whole_rows = pl.BlockSpec((np_,), lambda j, k: (0,))
    dw = pl.pallas_call(
        dw_kernel,
        out_shape=_out(wp.shape, w.dtype, hp),
        grid=(g["nv"], g["nd"]),
        in_specs=[pl.BlockSpec(hp.shape, lambda j, k: (0, 0)),
                  pl.BlockSpec((wp.shape[0], bv), lambda j, k: (0, j)),
                  whole_rows, whole_rows, whole_rows, whole_rows],
        out_specs=pl.BlockSpec((bd, bv), lambda j, k: (k, j)),
        compiler_params=params, interpret=interpret, name="linear_cross_entropy_dw",
    )(hp, wp, lp, *rows)
    return dh[:n, :d], dw[:d, :vocab]


# --- TPU ---------------------------------------------------------------------------------------

def _tpu_stats_kernel(h_ref, w_ref, lab_ref, lse_ref, ll_ref, m_sc, s_sc, ll_sc, *, vocab, bv, nv):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        ll_sc[...] = jnp.zeros(ll_sc.shape, jnp.float32)

    cols, logits = _mask_columns(_dot(h_ref[...], w_ref[...], (1, 0)), j * bv, vocab)
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    s_sc[...] = s_sc[...] * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new), axis=1, keepdims=True)
    m_sc[...] = m_new
    ll_sc[...] += jnp.sum(jnp.where(cols == lab_ref[...], logits, 0.0), axis=1, keepdims=True)

    @pl.when(j == nv - 1)
    def _():
        lse_ref[...] = m_sc[...] + jnp.log(s_sc[...])
        ll_ref[...] = ll_sc[...]


def _tpu_dlogits(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, col0, vocab):
    cols, logits = _mask_columns(_dot(h_ref[...], w_ref[...], (1, 0)), col0, vocab)
    p = jnp.exp(logits - lse_ref[...])
    return p * coef_ref[...] - jnp.where(cols == lab_ref[...], gl_ref[...], 0.0)


def _tpu_dh_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dh_ref, acc, *, vocab, bv, nv):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    dl = _tpu_dlogits(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, j * bv, vocab)
    acc[...] += _dot(dl.astype(w_ref.dtype), w_ref[...], (1, 1))

    @pl.when(j == nv - 1)
    def _():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _tpu_dw_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dw_ref, acc, *, vocab, bv, nt):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    dl = _tpu_dlogits(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, j * bv, vocab)
    acc[...] += _dot(h_ref[...], dl.astype(h_ref.dtype), (0, 0))

    @pl.when(i == nt - 1)
    def _():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def _tpu_layout(h, w, labels, block_tokens, block_vocab):
    n = h.shape[0]
    vocab = w.shape[1]
    bt = _tile(block_tokens, n, MIN_BLOCK_TOKENS)
    bv = _tile(block_vocab, vocab, MIN_BLOCK_VOCAB["tpu"])
    np_, vp = _round_up(n, bt), _round_up(vocab, bv)
    hp = _pad_to(h, 0, np_)
    wp = _pad_to(w, 1, vp)
    lp = _pad_to(labels.astype(jnp.int32), 0, np_, -1)[:, None]
    return hp, wp, lp, dict(vocab=vocab, bt=bt, bv=bv, nt=np_ // bt, nv=vp // bv)


def tpu_stats(h, w, labels, *, block_tokens: int, block_vocab: int, interpret: bool = False,
              **_: Any) -> tuple[jax.Array, jax.Array]:
    """(lse, label_logit), each (tokens,) fp32, on TPU: grid (token blocks, vocab blocks)."""
    from jax.experimental.pallas import tpu as pltpu
    n, d = h.shape
    hp, wp, lp, g = _tpu_layout(h, w, labels, block_tokens, block_vocab)
    bt, bv = g["bt"], g["bv"]
    col = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    lse, ll = pl.pallas_call(
        functools.partial(_tpu_stats_kernel, vocab=g["vocab"], bv=bv, nv=g["nv"]),
        out_shape=(_out((hp.shape[0], 1), jnp.float32, hp),) * 2,
        grid=(g["nt"], g["nv"]),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                  col],
        out_specs=(col, col),
        scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32) for _ in range(3)],
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name="linear_cross_entropy_stats",
    )(hp, wp, lp)
    return lse[:n, 0], ll[:n, 0]


def tpu_grads(h, w, labels, lse, coef, g_label, *, block_tokens: int, block_vocab: int,
              interpret: bool = False, **_: Any) -> tuple[jax.Array, jax.Array]:
    """(dh, dw) in h's and w's dtypes, by two TPU kernels with fp32 VMEM accumulators."""
    from jax.experimental.pallas import tpu as pltpu
    n, d = h.shape
    vocab = w.shape[1]
    hp, wp, lp, g = _tpu_layout(h, w, labels, block_tokens, block_vocab)
    bt, bv, np_ = g["bt"], g["bv"], hp.shape[0]
    rows = [_pad_to(x.astype(jnp.float32), 0, np_)[:, None] for x in (lse, coef, g_label)]

    col = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    dh = pl.pallas_call(
        functools.partial(_tpu_dh_kernel, vocab=vocab, bv=bv, nv=g["nv"]),
        out_shape=_out(hp.shape, h.dtype, hp),
        grid=(g["nt"], g["nv"]),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((d, bv), lambda i, j: (0, j)),
                  col, col, col, col],
        out_specs=pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((bt, d), jnp.float32)],
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret), name="linear_cross_entropy_dh",
    )(hp, wp, lp, *rows)

    col_t = pl.BlockSpec((bt, 1), lambda j, i: (i, 0))
    dw = pl.pallas_call(
        functools.partial(_tpu_dw_kernel, vocab=vocab, bv=bv, nt=g["nt"]),
        out_shape=_out(wp.shape, w.dtype, hp),
        grid=(g["nv"], g["nt"]),
        in_specs=[pl.BlockSpec((bt, d), lambda j, i: (i, 0)),
                  pl.BlockSpec((d, bv), lambda j, i: (0, j)),
                  col_t, col_t, col_t, col_t],
        out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
        scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret), name="linear_cross_entropy_dw",
    )(hp, wp, lp, *rows)
    return dh[:n], dw[:, :vocab]
