"""Sampling from a trained language model, under the same plan it trained with."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.parallel.plan import Plan
from mlsys_jax.train.model import LanguageModel


def generate(model: LanguageModel, plan: Plan, params: Any, prompts: list[np.ndarray], *,
             new_tokens: int, temperature: float = 0.8, seed: int = 0) -> list[np.ndarray]:
    """Continue each prompt by ``new_tokens`` tokens (greedy when ``temperature`` is 0).

    Every step reruns the model over a fixed-length buffer (no cache): one compile, and causal
    attention keeps the unwritten tail from affecting what comes before it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    shards = plan.batch_shards
    rows = -(-len(prompts) // shards) * shards
    length = max(len(p) for p in prompts) + new_tokens
    buf = np.zeros((rows, length), np.int32)
    pos = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
        pos[i] = len(p)
    param_sh = jax.tree_util.tree_map(lambda a: a.sharding, params)

    def run(params: Any, buf: jax.Array, pos: jax.Array, key: jax.Array) -> jax.Array:
        def body(_, carry):
            buf, pos, key = carry
            logits = model.apply(params, buf, plan)
            last = jnp.take_along_axis(logits, (pos - 1)[:, None, None], axis=1)[:, 0]
            key, sub = jax.random.split(key)
            if temperature > 0:
                nxt = jax.random.categorical(sub, last / temperature, axis=-1)
            else:
                nxt = jnp.argmax(last, axis=-1)
            buf = buf.at[jnp.arange(buf.shape[0]), pos].set(nxt.astype(buf.dtype))
            return buf, pos + 1, key

        buf, _, _ = jax.lax.fori_loop(0, new_tokens, body, (buf, pos, key))
        return buf

    rep = plan.replicated()
    out = jax.jit(run, in_shardings=(param_sh, rep, rep, rep), out_shardings=rep)(
        params, buf, pos, jax.random.PRNGKey(seed)
    )
    out = np.asarray(out.addressable_data(0))  # replicated: every process holds it all
    return [out[i, len(p) : len(p) + new_tokens] for i, p in enumerate(prompts)]
