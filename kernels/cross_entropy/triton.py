"""The fused linear cross-entropy on the Triton lowering: backend ``pallas_triton`` (GPU).

A program per token block loops over vocabulary blocks (stats); the backward is two kernels
without atomics, dh (a program per token block x feature block, looping over the vocabulary) and
dw (a program per vocabulary block x feature block, looping over tokens). Every tile is a power
of two and the feature dim is walked in ``block_d`` chunks, so no tile holds a whole hidden row;
each logits tile is fp32-accumulated. On CPU the kernels run in Pallas's interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mlsys_jax.kernels.cross_entropy.fused import pallas_backend
from mlsys_jax.kernels.cross_entropy.options import LossBlocks
from mlsys_jax.kernels.cross_entropy.tiles import (
    MIN_BLOCK_TOKENS,
    MIN_BLOCK_VOCAB,
    NEG_INF,
    dlogits,
    dot,
    mask_columns,
    pad_to,
    round_up,
    tile,
    triton_block_d,
)
from mlsys_jax.kernels.lowering import triton_params
from mlsys_jax.kernels.vma import out_shape

__all__ = ["BACKEND", "DEFAULTS", "candidates", "triton_grads", "triton_stats"]

# --- kernels ------------------------------------------------------------------------------------


def _triton_logits(h_ref, w_ref, rows, col0, bv: int, bd: int, nd: int, bt: int) -> jax.Array:
    """fp32 logits of token rows ``rows`` (a slice of h_ref) and columns col0:col0+bv, summed
    over feature chunks of ``bd``."""

    def body(k, acc):
        d0 = pl.multiple_of(k * bd, bd)
        hk = h_ref[rows, pl.ds(d0, bd)]
        wk = w_ref[pl.ds(d0, bd), pl.ds(col0, bv)]
        return acc + dot(hk, wk, (1, 0))

    return lax.fori_loop(0, nd, body, jnp.zeros((bt, bv), jnp.float32))


def _triton_stats_kernel(h_ref, w_ref, lab_ref, lse_ref, ll_ref, *, vocab, bt, bv, bd, nv, nd):
    labels = lab_ref[...]

    def body(j, carry):
        m, s, ll = carry
        col0 = pl.multiple_of(j * bv, bv)
        raw = _triton_logits(h_ref, w_ref, slice(None), col0, bv, bd, nd, bt)
        cols, logits = mask_columns(raw, col0, vocab)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        ll = ll + jnp.sum(jnp.where(cols == labels[:, None], logits, 0.0), axis=1)
        return m_new, s, ll

    init = (jnp.full((bt,), NEG_INF, jnp.float32), jnp.zeros((bt,), jnp.float32), jnp.zeros((bt,), jnp.float32))
    m, s, ll = lax.fori_loop(0, nv, body, init)
    lse_ref[...] = m + jnp.log(s)
    ll_ref[...] = ll


def _triton_dh_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dh_ref, *, vocab, bt, bv, bd, nv, nd):
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)
    labels, lse, coef, gl = lab_ref[...], lse_ref[...], coef_ref[...], gl_ref[...]

    def body(j, acc):
        col0 = pl.multiple_of(j * bv, bv)
        raw = _triton_logits(h_ref, w_ref, slice(None), col0, bv, bd, nd, bt)
        cols, logits = mask_columns(raw, col0, vocab)
        dl = dlogits(logits, cols, labels, lse, coef, gl)
        wk = w_ref[pl.ds(d0, bd), pl.ds(col0, bv)]
        return acc + dot(dl.astype(wk.dtype), wk, (1, 1))

    acc = lax.fori_loop(0, nv, body, jnp.zeros((bt, bd), jnp.float32))
    dh_ref[...] = acc.astype(dh_ref.dtype)


def _triton_dw_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dw_ref, *, vocab, bt, bv, bd, nt, nd):
    col0 = pl.multiple_of(pl.program_id(0) * bv, bv)
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)

    def body(i, acc):
        rows = pl.ds(pl.multiple_of(i * bt, bt), bt)
        raw = _triton_logits(h_ref, w_ref, rows, 0, bv, bd, nd, bt)
        cols, logits = mask_columns(raw, col0, vocab)
        dl = dlogits(logits, cols, lab_ref[rows], lse_ref[rows], coef_ref[rows], gl_ref[rows])
        hk = h_ref[rows, pl.ds(d0, bd)]
        return acc + dot(hk, dl.astype(hk.dtype), (0, 0))

    acc = lax.fori_loop(0, nt, body, jnp.zeros((bd, bv), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _triton_layout(h, w, labels, block_tokens, block_vocab):
    n, d = h.shape
    vocab = w.shape[1]
    bt = tile(block_tokens, n, MIN_BLOCK_TOKENS)
    bv = tile(block_vocab, vocab, MIN_BLOCK_VOCAB["triton"])
    bd = triton_block_d(d)
    np_, vp, dp = round_up(n, bt), round_up(vocab, bv), round_up(d, bd)
    hp = pad_to(pad_to(h, 0, np_), 1, dp)
    wp = pad_to(pad_to(w, 0, dp), 1, vp)
    lp = pad_to(labels.astype(jnp.int32), 0, np_, -1)
    return hp, wp, lp, {"vocab": vocab, "bt": bt, "bv": bv, "bd": bd, "nt": np_ // bt, "nv": vp // bv, "nd": dp // bd}


def triton_stats(
    h,
    w,
    labels,
    *,
    block_tokens: int,
    block_vocab: int,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(lse, label_logit), each (tokens,) fp32, of h (tokens, D) @ w (D, V) on Triton."""
    n = h.shape[0]
    hp, wp, lp, g = _triton_layout(h, w, labels, block_tokens, block_vocab)
    bt, np_ = g["bt"], g["nt"] * g["bt"]
    kernel = functools.partial(
        _triton_stats_kernel, vocab=g["vocab"], bt=bt, bv=g["bv"], bd=g["bd"], nv=g["nv"], nd=g["nd"]
    )
    lse, ll = pl.pallas_call(
        kernel,
        out_shape=(out_shape((np_,), jnp.float32, hp),) * 2,
        grid=(g["nt"],),
        in_specs=[
            pl.BlockSpec((bt, hp.shape[1]), lambda i: (i, 0)),
            pl.BlockSpec(wp.shape, lambda i: (0, 0)),
            pl.BlockSpec((bt,), lambda i: (i,)),
        ],
        out_specs=(pl.BlockSpec((bt,), lambda i: (i,)),) * 2,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="linear_cross_entropy_stats",
    )(hp, wp, lp)
    return lse[:n], ll[:n]


def triton_grads(
    h,
    w,
    labels,
    lse,
    coef,
    g_label,
    *,
    block_tokens: int,
    block_vocab: int,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(dh, dw) in h's and w's dtypes, by two Triton kernels (no atomics)."""
    n, d = h.shape
    vocab = w.shape[1]
    hp, wp, lp, g = _triton_layout(h, w, labels, block_tokens, block_vocab)
    bt, bv, bd, np_ = g["bt"], g["bv"], g["bd"], g["nt"] * g["bt"]
    # Padded tokens get coef = g_label = 0, so they add nothing to dw.
    rows = [pad_to(x.astype(jnp.float32), 0, np_) for x in (lse, coef, g_label)]
    params = triton_params(num_warps, num_stages)
    dh_kernel = functools.partial(_triton_dh_kernel, vocab=vocab, bt=bt, bv=bv, bd=bd, nv=g["nv"], nd=g["nd"])
    row_block = pl.BlockSpec((bt,), lambda i, k: (i,))
    dh = pl.pallas_call(
        dh_kernel,
        out_shape=out_shape(hp.shape, h.dtype, hp),
        grid=(g["nt"], g["nd"]),
        in_specs=[
            pl.BlockSpec((bt, hp.shape[1]), lambda i, k: (i, 0)),
            pl.BlockSpec(wp.shape, lambda i, k: (0, 0)),
            row_block,
            row_block,
            row_block,
            row_block,
        ],
        out_specs=pl.BlockSpec((bt, bd), lambda i, k: (i, k)),
        compiler_params=params,
        interpret=interpret,
        name="linear_cross_entropy_dh",
    )(hp, wp, lp, *rows)
    dw_kernel = functools.partial(_triton_dw_kernel, vocab=vocab, bt=bt, bv=bv, bd=bd, nt=g["nt"], nd=g["nd"])
    whole_rows = pl.BlockSpec((np_,), lambda j, k: (0,))
    dw = pl.pallas_call(
        dw_kernel,
        out_shape=out_shape(wp.shape, w.dtype, hp),
        grid=(g["nv"], g["nd"]),
        in_specs=[
            pl.BlockSpec(hp.shape, lambda j, k: (0, 0)),
            pl.BlockSpec((wp.shape[0], bv), lambda j, k: (0, j)),
            whole_rows,
            whole_rows,
            whole_rows,
            whole_rows,
        ],
        out_specs=pl.BlockSpec((bd, bv), lambda j, k: (k, j)),
        compiler_params=params,
        interpret=interpret,
        name="linear_cross_entropy_dw",
    )(hp, wp, lp, *rows)
    return dh[:n, :d], dw[:d, :vocab]


# --- block sizes and the backend ----------------------------------------------------------------

#: Default tiles per device kind; "cpu" is the interpreter.
DEFAULTS = {
    "H200": LossBlocks(block_tokens=64, block_vocab=256, num_warps=8, num_stages=3),
    "H100": LossBlocks(block_tokens=64, block_vocab=256, num_warps=8, num_stages=3),
    "A100": LossBlocks(block_tokens=64, block_vocab=128, num_warps=4, num_stages=2),
    "cpu": LossBlocks(block_tokens=32, block_vocab=128),
}


def candidates(platform: str) -> list[LossBlocks]:
    """Tiles autotuning tries: (tokens, vocab) pairs from 32x128 to 128x256 on a GPU, two
    interpreted."""
    pairs = [(32, 128), (64, 128), (64, 256), (128, 128), (128, 256)] if platform == "gpu" else [(16, 128), (32, 256)]
    return [LossBlocks(t, v) for t, v in pairs]


BACKEND = pallas_backend("pallas_triton", ("gpu",), triton_stats, triton_grads, 1, DEFAULTS, candidates)
