"""Next-token cross-entropy as a (sum, count) pair, so microbatches add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum over unmasked tokens of -log softmax(logits)[target], and how many tokens there were.

    The target's log-probability is read with a one-hot product rather than a gather, which
    partitions cleanly when the vocabulary is sharded.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1], dtype=logp.dtype), axis=-1)
    weights = mask.astype(jnp.float32)
    return -jnp.sum(picked * weights), jnp.sum(weights)
