"""The fused linear cross-entropy on the TPU (Mosaic) lowering: backend ``pallas_tpu``.

The loops are grid axes marked "arbitrary" with fp32 VMEM accumulators; tiles hold a whole
feature row ((block_tokens, D) and (D, block_vocab)). On CPU the kernels run in the TPU
interpreter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlsys_jax.kernels.cross_entropy.fused import pallas_backend
from mlsys_jax.kernels.cross_entropy.options import LossBlocks
from mlsys_jax.kernels.cross_entropy.tiles import (
    MIN_BLOCK_TOKENS,
    MIN_BLOCK_VOCAB,
    NEG_INF,
    dot,
    mask_columns,
    pad_to,
    round_up,
    tile,
)
from mlsys_jax.kernels.lowering import tpu_interpret, tpu_params
from mlsys_jax.kernels.vma import out_shape

__all__ = ["BACKEND", "DEFAULTS", "candidates", "tpu_grads", "tpu_stats"]

# --- kernels ---------------------------------------------------------------------------------------


def _tpu_stats_kernel(h_ref, w_ref, lab_ref, lse_ref, ll_ref, m_sc, s_sc, ll_sc, *, vocab, bv, nv):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        ll_sc[...] = jnp.zeros(ll_sc.shape, jnp.float32)

    cols, logits = mask_columns(dot(h_ref[...], w_ref[...], (1, 0)), j * bv, vocab)
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    s_sc[...] = s_sc[...] * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new), axis=1, keepdims=True)
    m_sc[...] = m_new
    ll_sc[...] += jnp.sum(jnp.where(cols == lab_ref[...], logits, 0.0), axis=1, keepdims=True)

    @pl.when(j == nv - 1)
    def _():
        lse_ref[...] = m_sc[...] + jnp.log(s_sc[...])
        ll_ref[...] = ll_sc[...]


def _tpudlogits(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, col0, vocab):
    cols, logits = mask_columns(dot(h_ref[...], w_ref[...], (1, 0)), col0, vocab)
    p = jnp.exp(logits - lse_ref[...])
    return p * coef_ref[...] - jnp.where(cols == lab_ref[...], gl_ref[...], 0.0)


def _tpu_dh_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dh_ref, acc, *, vocab, bv, nv):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    dl = _tpudlogits(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, j * bv, vocab)
    acc[...] += dot(dl.astype(w_ref.dtype), w_ref[...], (1, 1))

    @pl.when(j == nv - 1)
    def _():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _tpu_dw_kernel(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, dw_ref, acc, *, vocab, bv, nt):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    dl = _tpudlogits(h_ref, w_ref, lab_ref, lse_ref, coef_ref, gl_ref, j * bv, vocab)
    acc[...] += dot(h_ref[...], dl.astype(h_ref.dtype), (0, 0))

    @pl.when(i == nt - 1)
    def _():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def _tpu_layout(h, w, labels, block_tokens, block_vocab):
    n = h.shape[0]
    vocab = w.shape[1]
    bt = tile(block_tokens, n, MIN_BLOCK_TOKENS)
    bv = tile(block_vocab, vocab, MIN_BLOCK_VOCAB["tpu"])
    np_, vp = round_up(n, bt), round_up(vocab, bv)
    hp = pad_to(h, 0, np_)
    wp = pad_to(w, 1, vp)
    lp = pad_to(labels.astype(jnp.int32), 0, np_, -1)[:, None]
    return hp, wp, lp, {"vocab": vocab, "bt": bt, "bv": bv, "nt": np_ // bt, "nv": vp // bv}


def tpu_stats(
    h, w, labels, *, block_tokens: int, block_vocab: int, interpret: bool = False, **_: Any
) -> tuple[jax.Array, jax.Array]:
    """(lse, label_logit), each (tokens,) fp32, on TPU: grid (token blocks, vocab blocks)."""
    from jax.experimental.pallas import tpu as pltpu

    n, d = h.shape
    hp, wp, lp, g = _tpu_layout(h, w, labels, block_tokens, block_vocab)
    bt, bv = g["bt"], g["bv"]
    col = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    lse, ll = pl.pallas_call(
        functools.partial(_tpu_stats_kernel, vocab=g["vocab"], bv=bv, nv=g["nv"]),
        out_shape=(out_shape((hp.shape[0], 1), jnp.float32, hp),) * 2,
        grid=(g["nt"], g["nv"]),
        in_specs=[pl.BlockSpec((bt, d), lambda i, j: (i, 0)), pl.BlockSpec((d, bv), lambda i, j: (0, j)), col],
        out_specs=(col, col),
        scratch_shapes=[pltpu.VMEM((bt, 1), jnp.float32) for _ in range(3)],
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name="linear_cross_entropy_stats",
    )(hp, wp, lp)
    return lse[:n, 0], ll[:n, 0]


def tpu_grads(
    h, w, labels, lse, coef, g_label, *, block_tokens: int, block_vocab: int, interpret: bool = False, **_: Any
) -> tuple[jax.Array, jax.Array]:
    """(dh, dw) in h's and w's dtypes, by two TPU kernels with fp32 VMEM accumulators."""
    from jax.experimental.pallas import tpu as pltpu

    n, d = h.shape
    vocab = w.shape[1]
    hp, wp, lp, g = _tpu_layout(h, w, labels, block_tokens, block_vocab)
    bt, bv, np_ = g["bt"], g["bv"], hp.shape[0]
    rows = [pad_to(x.astype(jnp.float32), 0, np_)[:, None] for x in (lse, coef, g_label)]

    col = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    dh = pl.pallas_call(
        functools.partial(_tpu_dh_kernel, vocab=vocab, bv=bv, nv=g["nv"]),
        out_shape=out_shape(hp.shape, h.dtype, hp),
        grid=(g["nt"], g["nv"]),
        in_specs=[
            pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
            pl.BlockSpec((d, bv), lambda i, j: (0, j)),
            col,
            col,
            col,
            col,
        ],
        out_specs=pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((bt, d), jnp.float32)],
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name="linear_cross_entropy_dh",
    )(hp, wp, lp, *rows)

    col_t = pl.BlockSpec((bt, 1), lambda j, i: (i, 0))
    dw = pl.pallas_call(
        functools.partial(_tpu_dw_kernel, vocab=vocab, bv=bv, nt=g["nt"]),
        out_shape=out_shape(wp.shape, w.dtype, hp),
        grid=(g["nv"], g["nt"]),
        in_specs=[
            pl.BlockSpec((bt, d), lambda j, i: (i, 0)),
            pl.BlockSpec((d, bv), lambda j, i: (0, j)),
            col_t,
            col_t,
            col_t,
            col_t,
        ],
        out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
        scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
        compiler_params=tpu_params(("parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name="linear_cross_entropy_dw",
    )(hp, wp, lp, *rows)
    return dh[:n], dw[:, :vocab]


# --- block sizes and the backend ----------------------------------------------------------------

#: Default tiles per device kind; "cpu" is the TPU interpreter (vocab blocks in 128s).
DEFAULTS = {"TPU": LossBlocks(block_tokens=256, block_vocab=1024), "cpu": LossBlocks(block_tokens=32, block_vocab=128)}


def candidates(platform: str) -> list[LossBlocks]:
    """Tiles autotuning tries: 128x512 to 512x2048 on a TPU, two interpreted."""
    pairs = [(128, 512), (256, 1024), (512, 2048)] if platform == "tpu" else [(16, 128), (32, 256)]
    return [LossBlocks(t, v) for t, v in pairs]


BACKEND = pallas_backend("pallas_tpu", ("tpu",), tpu_stats, tpu_grads, MIN_BLOCK_VOCAB["tpu"], DEFAULTS, candidates)
