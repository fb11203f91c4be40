"""The fused loss's two primitives as XLA loops: backend ``chunked`` (every platform).

Each step of its loops is one XLA matmul over a (block_tokens, block_vocab) tile, so its tiles are
much larger than a Pallas kernel's; the largest array it makes is one such tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax.kernels.blocks import ANY_DEVICE
from mlsys_jax.kernels.cross_entropy.fused import fused_vjp
from mlsys_jax.kernels.cross_entropy.options import LossBlocks, LossOptions, dtype_check
from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.vma import vary_like

# --- the primitives ------------------------------------------------------------


def _chunks(size: int, block: int) -> tuple[int, int]:
    """(chunk, count): chunks of at most ``block`` covering ``size``; the last one is shifted
    back to end at ``size`` (so no array is padded) and overlaps its predecessor."""
    chunk = max(1, min(block, size))
    return chunk, -(-size // chunk)


def _chunk_logits(hc: jax.Array, w: jax.Array, j: jax.Array, bv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Logits of token chunk ``hc`` against vocab chunk ``j``: (column ids, logits, fresh) where
    ``fresh`` marks columns no earlier chunk covered."""
    v0 = jnp.minimum(j * bv, w.shape[1] - bv)
    wj = lax.dynamic_slice_in_dim(w, v0, bv, axis=1)
    cols = v0 + jnp.arange(bv, dtype=jnp.int32)
    logits = jnp.dot(hc, wj, preferred_element_type=jnp.float32)
    return cols, logits, cols >= j * bv


def chunked_stats(h: jax.Array, w: jax.Array, labels: jax.Array, opts: LossOptions) -> tuple[jax.Array, jax.Array]:
    """(lse, label_logit) over this shard's vocabulary by token chunks and an online
    log-sum-exp over vocab chunks; the largest array made is one (block_tokens, block_vocab) tile."""
    n = h.shape[0]
    bt, nt = _chunks(n, opts.blocks.block_tokens)
    bv, nv = _chunks(w.shape[1], opts.blocks.block_vocab)

    def token_chunk(i):
        t0 = jnp.minimum(i * bt, n - bt)
        hc = lax.dynamic_slice_in_dim(h, t0, bt)
        lc = lax.dynamic_slice_in_dim(labels, t0, bt)

        def vocab_chunk(carry, j):
            m, s, ll = carry
            cols, logits, fresh = _chunk_logits(hc, w, j, bv)
            logits = jnp.where(fresh[None, :], logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
            is_label = (cols[None, :] == lc[:, None]) & fresh[None, :]
            ll = ll + jnp.sum(jnp.where(is_label, logits, 0.0), axis=1)
            return (m_new, s, ll), None

        init = (jnp.full((bt,), -jnp.inf, jnp.float32), jnp.zeros((bt,), jnp.float32), jnp.zeros((bt,), jnp.float32))
        init = tuple(vary_like(x, hc, w, lc) for x in init)
        (m, s, ll), _ = lax.scan(vocab_chunk, init, jnp.arange(nv))
        return t0, m + jnp.log(s), ll

    def step(carry, i):
        lse_all, ll_all = carry
        t0, lse, ll = token_chunk(i)
        return (
            lax.dynamic_update_slice_in_dim(lse_all, lse, t0, 0),
            lax.dynamic_update_slice_in_dim(ll_all, ll, t0, 0),
        ), None

    zeros = vary_like(jnp.zeros((n,), jnp.float32), h, w, labels)
    (lse, ll), _ = lax.scan(step, (zeros, zeros), jnp.arange(nt))
    return lse, ll


def chunked_grads(
    h: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    lse: jax.Array,
    coef: jax.Array,
    g_label: jax.Array,
    opts: LossOptions,
) -> tuple[jax.Array, jax.Array]:
    """(dh, dw) with dlogits = softmax * coef - onehot * g_label recomputed per tile, in two
    passes that each own their output: dh by token chunk (summing over vocab chunks), dw by vocab
    chunk (summing over token chunks). Only one chunk of either is ever held in fp32."""
    n, d = h.shape
    vocab = w.shape[1]
    bt, nt = _chunks(n, opts.blocks.block_tokens)
    bv, nv = _chunks(vocab, opts.blocks.block_vocab)
    like = (h, w, labels, lse, coef, g_label)

    def token_rows(i):
        t0 = jnp.minimum(i * bt, n - bt)
        rows = tuple(lax.dynamic_slice_in_dim(x, t0, bt) for x in like if x is not w)
        return t0, (t0 + jnp.arange(bt)) >= i * bt, rows

    def dlogits(rows, j):
        hc, lc, lsec, cc, gc = rows
        cols, logits, fresh = _chunk_logits(hc, w, j, bv)
        dl = jnp.exp(logits - lsec[:, None]) * cc[:, None]
        return cols[0], fresh, dl - jnp.where(cols[None, :] == lc[:, None], gc[:, None], 0.0)

    def dh_chunk(dh, i):
        t0, _, rows = token_rows(i)

        def add(acc, j):
            v0, fresh, dl = dlogits(rows, j)
            dl = jnp.where(fresh[None, :], dl, 0.0).astype(w.dtype)  # columns not yet added
            wj = lax.dynamic_slice_in_dim(w, v0, bv, axis=1)
            return acc + jnp.dot(dl, wj.T, preferred_element_type=jnp.float32), None

        acc = vary_like(jnp.zeros((bt, d), jnp.float32), *like)
        acc, _ = lax.scan(add, acc, jnp.arange(nv))
        return lax.dynamic_update_slice_in_dim(dh, acc.astype(h.dtype), t0, 0), None

    def dw_chunk(dw, j):
        v0 = jnp.minimum(j * bv, vocab - bv)

        def add(acc, i):
            _, fresh_rows, rows = token_rows(i)
            _, _, dl = dlogits(rows, j)
            dl = jnp.where(fresh_rows[:, None], dl, 0.0).astype(h.dtype)  # rows not yet added
            return acc + jnp.dot(rows[0].T, dl, preferred_element_type=jnp.float32), None

        acc = vary_like(jnp.zeros((d, bv), jnp.float32), *like)
        acc, _ = lax.scan(add, acc, jnp.arange(nt))
        return lax.dynamic_update_slice_in_dim(dw, acc.astype(w.dtype), v0, axis=1), None

    dh, _ = lax.scan(dh_chunk, vary_like(jnp.zeros((n, d), h.dtype), *like), jnp.arange(nt))
    dw, _ = lax.scan(dw_chunk, vary_like(jnp.zeros((d, vocab), w.dtype), *like), jnp.arange(nv))
    return dh, dw


#: Chunks on any device when no blocks are given (8 MiB of fp32 logits per tile).
DEFAULTS = {ANY_DEVICE: LossBlocks(block_tokens=1024, block_vocab=2048)}


def candidates(platform: str) -> list[LossBlocks]:
    """Chunks autotuning tries: 512-2048 tokens by 1024-4096 vocabulary entries."""
    del platform
    return [LossBlocks(t, v) for t, v in ((512, 1024), (1024, 2048), (2048, 4096))]


BACKEND = Backend(
    "chunked",
    ("cpu", "gpu", "tpu"),
    fused_vjp(chunked_stats, chunked_grads),
    dtype_check,
    blocks=LossBlocks,
    defaults=DEFAULTS,
    candidates=candidates,
)
