"""A differentiable, vocab-parallel loss from two chunked primitives, and the Pallas backends
built on it.

    stats(h, w, labels) -> (lse, label_logit)                     online log-sum-exp over vocab tiles
    grads(h, w, labels, lse, coef, g_label) -> (dh, dw)            dlogits recomputed per tile

``fused_vjp`` turns any such pair into one loss: with ``vocab_axis`` (inside ``jax.shard_map``)
``weight`` is this shard's contiguous slice of the vocabulary, the shards' log-sum-exps are
combined (pmax, psum of exp), label logits are psummed, and dh is psummed in the backward while
each shard's dw stays local. The whole (tokens, vocab) logits never exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax.kernels.cross_entropy.options import LossBlocks, LossOptions, dtype_check
from mlsys_jax.kernels.cross_entropy.reference import vocab_offset
from mlsys_jax.kernels.cross_entropy.tiles import MIN_BLOCK_TOKENS
from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.vma import sum_to_vma_of, vary_like, varying_axes

Stats = Callable[..., tuple[jax.Array, jax.Array]]
Grads = Callable[..., tuple[jax.Array, jax.Array]]


# --- the fused loss from two primitives ----------------------------------------------------------


def fused_vjp(stats: Stats, grads: Grads) -> Callable[..., jax.Array]:
    """A differentiable per-token loss ``loss(h, w, labels, opts)`` (h (..., D), labels (...))
    from the two primitives ``stats(h, w, labels_local, opts)`` and
    ``grads(h, w, labels_local, lse, coef, g_label, opts)``, which see (tokens, D) and (tokens,).

    ``labels_local`` is the label's column in this vocabulary shard, or -1 when the token is
    ignored or its label lives in another shard.
    """

    def forward(h, w, labels, opts):
        vocab = w.shape[1]
        valid = labels != opts.ignore_index
        local = labels - vocab_offset(vocab, opts.vocab_axis)
        labels_local = jnp.where(valid & (local >= 0) & (local < vocab), local, -1).astype(jnp.int32)
        lse, label_logit = stats(h, w, labels_local, opts)
        if opts.vocab_axis is not None:
            m = lax.pmax(lse, opts.vocab_axis)
            lse = m + jnp.log(lax.psum(jnp.exp(lse - m), opts.vocab_axis))
            label_logit = lax.psum(label_logit, opts.vocab_axis)
        loss = jnp.where(valid, lse - label_logit + opts.z_loss * lse**2, 0.0)
        return loss, (h, w, labels_local, valid, lse)

    def primal(h, w, labels, opts) -> jax.Array:
        return forward(h, w, labels, opts)[0]

    loss = jax.custom_vjp(primal, nondiff_argnums=(3,))

    def loss_bwd(opts, res, g):
        h, w, labels_local, valid, lse = res
        # Under shard_map(check_vma=True) the weight's type says it varies over the vocabulary
        # axes. Without that checking, shard_map's transpose hands each vocabulary shard 1/T of
        # the loss's cotangent and sums dh and dw over the axes their inputs are replicated on
        # itself: undo the split, and leave the sums to it.
        tracked = opts.vocab_axis is None or set(opts.vocab_axis) <= varying_axes(w)
        if not tracked:
            g = lax.psum(g, opts.vocab_axis)
        g = jnp.where(valid, g.astype(jnp.float32), 0.0)
        coef = g * (1.0 + 2.0 * opts.z_loss * lse)
        dh, dw = grads(h, w, labels_local, lse, coef, g, opts)
        if opts.vocab_axis is not None and tracked:
            dh = lax.psum(dh, opts.vocab_axis)
        return sum_to_vma_of(dh, h), sum_to_vma_of(dw, w), None

    loss.defvjp(forward, loss_bwd)

    def flat(h, w, labels, opts):  # the primitives see (tokens, D) and (tokens,)
        out = loss(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), opts)
        return out.reshape(labels.shape)

    return flat


def _check_pallas_blocks(name: str, blocks: LossBlocks, vocab_multiple: int) -> None:
    for field in ("block_tokens", "block_vocab"):
        value = getattr(blocks, field)
        if value & (value - 1) or value < MIN_BLOCK_TOKENS:
            raise ValueError(
                f"linear_cross_entropy[{name}]: blocks.{field}={value} must be a power of two >= "
                f"{MIN_BLOCK_TOKENS} (the kernel's tiles). Fix: e.g. LossBlocks(64, 256)."
            )
    if blocks.block_vocab % vocab_multiple:
        raise ValueError(
            f"linear_cross_entropy[{name}]: blocks.block_vocab={blocks.block_vocab} must be a "
            f"multiple of {vocab_multiple}. Fix: use a larger block_vocab."
        )


def pallas_backend(
    name: str,
    platforms: tuple[str, ...],
    stats: Stats,
    grads: Grads,
    vocab_multiple: int,
    defaults: Mapping[str, LossBlocks],
    candidates: Callable[[str], Sequence[LossBlocks]],
) -> Backend:
    """The backend table's entry for a pair of Pallas primitives."""

    def kw(opts: LossOptions) -> dict[str, Any]:
        b = opts.blocks
        return {
            "block_tokens": b.block_tokens,
            "block_vocab": b.block_vocab,
            "num_warps": b.num_warps,
            "num_stages": b.num_stages,
            "interpret": opts.interpret,
        }

    def stats_(h, w, labels, opts):
        return stats(*_common_vma(h, w, labels), **kw(opts))

    def grads_(h, w, labels, lse, coef, g_label, opts):
        return grads(*_common_vma(h, w, labels, lse, coef, g_label), **kw(opts))

    loss = fused_vjp(stats_, grads_)

    def run(h, w, labels, opts, *, interpret: bool = False):
        _check_pallas_blocks(name, opts.blocks, vocab_multiple)
        return loss(h, w, labels, dataclasses.replace(opts, interpret=interpret))

    return Backend(
        name,
        platforms,
        run,
        dtype_check,
        interpretable=True,
        blocks=LossBlocks,
        defaults=defaults,
        candidates=candidates,
    )


def _common_vma(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Operands of one pallas_call made to vary over the same mesh axes."""
    return tuple(vary_like(x, *xs) for x in xs)
