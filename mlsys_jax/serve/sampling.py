"""Choosing each row's next token on the device, every row with its own settings and seed.

Row r draws with the key ``fold_in(key(seed_r), count_r)``, where ``count_r`` is how many tokens
its request has generated: a request's draws depend on nothing but its own seed and position,
so it gives the same output alone or in any batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.cross_entropy import log_probabilities

TOP_LOGPROBS = 20  # alternatives computed per token (requests take up to this many)


def _filtered(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """One row's logits with everything outside its top-k and its top-p nucleus at -inf."""
    order = jnp.sort(logits)[::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
    kth = order[k - 1]
    probs = jnp.exp(log_probabilities(order))
    before = jnp.cumsum(probs) - probs  # mass strictly above each sorted entry
    cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf))  # the smallest kept logit
    return jnp.where((logits >= kth) & (logits >= cutoff), logits, -jnp.inf)


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seed: jax.Array,
    count: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Next tokens of (rows, vocab) fp32 logits: greedy where temperature is 0, else drawn from
    the tempered, top-k and top-p filtered distribution. Returns the tokens (rows,), their
    log-probabilities under the model (rows,), and the model's top alternatives (ids and
    log-probabilities, (rows, TOP_LOGPROBS))."""

    def row(lg, t, k, p, s, c):
        tempered = _filtered(lg / jnp.maximum(t, 1e-6), k, p)
        drawn = jax.random.categorical(jax.random.fold_in(jax.random.key(s), c), tempered)
        return jnp.where(t > 0, drawn, jnp.argmax(lg)).astype(jnp.int32)

    tokens = jax.vmap(row)(logits, temperature, top_k, top_p, seed, count)
    logprobs = log_probabilities(logits)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp
