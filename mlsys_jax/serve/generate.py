"""Generation with a KV cache under a plan: prefill once, then one decode step per token.

``Generator`` jits the model's ``prefill`` and ``decode_step`` (from ``models.base``) under the
plan the model trained with, with the cache placed by its logical axes. Shapes are bucketed so a
few programs serve any request: rows round up to a multiple of the batch shards, prompts to a
power of two (at least ``MIN_BUCKET``), the cache to a power of two that holds prompt and new
tokens; each bucket compiles once. ``generate`` samples a batch of prompts of mixed lengths.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.models import base
from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.params import is_spec

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The power of two at or above ``max(n, minimum)``: the length a program is compiled for."""
    return 1 << (max(int(minimum), int(n), 1) - 1).bit_length()


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    """One token per row of (rows, vocab) logits: greedy at temperature 0, else sampled from
    softmax(logits / temperature)."""
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@dataclasses.dataclass
class Generator:
    """A model's prefill and decode step, jitted under ``plan`` once per shape bucket.

    ``traces`` counts how many times each program was traced (one per bucket it met).
    """

    model: LanguageModel
    plan: Plan
    traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        rep = self.plan.replicated()
        self._layout = self.plan.layout
        self._new_cache = jax.jit(self._zeros, static_argnums=(0, 1))
        self._prefill = jax.jit(self._prefill_fn, in_shardings=(None, rep, rep, None), donate_argnums=(3,))
        self._decode = jax.jit(self._decode_fn, in_shardings=(None, rep, rep, None), donate_argnums=(3,))
        self._loop = jax.jit(
            self._loop_fn, in_shardings=(None, None, None, rep, rep, rep, rep), out_shardings=rep, static_argnums=(7,)
        )

    # ---- shapes and placement ----------------------------------------------------------------
    def rows(self, n: int) -> int:
        """Rows of a batch of ``n`` prompts: a multiple of the batch shards."""
        shards = self.plan.batch_shards
        return -(-n // shards) * shards

    def cache_shardings(self, rows: int, max_len: int) -> Any:
        specs = self.model.cache_specs(rows, max_len)
        return jax.tree_util.tree_map(
            lambda s: self.plan.activation_sharding(s.logical_axes, s.shape, "kv cache"), specs, is_leaf=is_spec
        )

    def _zeros(self, rows: int, max_len: int) -> Any:
        cache = base.init_cache(self.model, rows, max_len)
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings(rows, max_len))

    def new_cache(self, rows: int, max_len: int) -> Any:
        """An empty cache for ``rows`` rows of ``max_len`` positions, placed by the plan."""
        return self._new_cache(rows, max_len)

    def _batch(self, x: jax.Array) -> jax.Array:
        axes = ("batch", "seq")[: x.ndim]
        return self.plan.constrain(x, axes, "decoded tokens")

    # ---- the programs --------------------------------------------------------------------------
    def _prefill_fn(self, params, tokens, lengths, cache):
        self.traces["prefill"] += 1
        return base.prefill(self.model, params, self._batch(tokens), cache, self._layout, lengths)

    def _decode_fn(self, params, tokens, positions, cache):
        self.traces["decode_step"] += 1
        return base.decode_step(self.model, params, self._batch(tokens), self._batch(positions), cache, self._layout)

    def _loop_fn(self, params, cache, logits, positions, key, steps, temperature, max_len):
        """Sample from the prompts' last ``logits`` and record the token at ``positions``, then
        ``steps`` times: decode, sample, record. Returns (rows, max_len) tokens, each row's new
        ones at their positions."""
        self.traces["decode_loop"] += 1
        slots = jnp.arange(max_len)[None, :]

        def record(out, token, position):
            return jnp.where(slots == position[:, None], token[:, None], out)

        def body(_, carry):
            out, cache, token, position, key = carry
            out = record(out, token, position)
            logits, cache = base.decode_step(
                self.model, params, self._batch(token), self._batch(position), cache, self._layout
            )
            key, sub = jax.random.split(key)
            return out, cache, sample_next(logits, sub, temperature), position + 1, key

        key, first_key = jax.random.split(key)
        first = sample_next(logits, first_key, temperature)
        out = jnp.zeros((first.shape[0], max_len), jnp.int32)
        out, _, token, position, _ = jax.lax.fori_loop(0, steps, body, (out, cache, first, positions, key))
        return record(out, token, position)

    def prefill(
        self, params: Any, tokens: np.ndarray, cache: Any, lengths: np.ndarray | None = None
    ) -> tuple[jax.Array, Any]:
        """``models.base.prefill`` under the plan (the cache is consumed and returned)."""
        return self._prefill(params, tokens, lengths, cache)

    def decode_step(self, params: Any, tokens: np.ndarray, positions: np.ndarray, cache: Any) -> tuple[jax.Array, Any]:
        """``models.base.decode_step`` under the plan (the cache is consumed and returned)."""
        return self._decode(params, tokens, positions, cache)

    # ---- sampling --------------------------------------------------------------------------------
    def generate(
        self, params: Any, prompts: list[np.ndarray], *, new_tokens: int, temperature: float = 0.8, seed: int = 0
    ) -> list[np.ndarray]:
        """Continue each prompt by ``new_tokens`` tokens (greedy when ``temperature`` is 0)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
        rows = self.rows(len(prompts))
        longest = max(len(p) for p in prompts)
        prompt_len = bucket(longest)
        max_len = bucket(max(prompt_len, longest + new_tokens))
        tokens = np.zeros((rows, prompt_len), np.int32)
        lengths = np.ones((rows,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        logits, cache = self.prefill(params, tokens, self.new_cache(rows, max_len), lengths)
        out = self._loop(
            params, cache, logits, lengths, jax.random.PRNGKey(seed), new_tokens - 1, np.float32(temperature), max_len
        )
        out = np.asarray(out.addressable_data(0))  # replicated: every process holds it all
        return [out[i, len(p) : len(p) + new_tokens] for i, p in enumerate(prompts)]


def generate(
    model: LanguageModel,
    plan: Plan,
    params: Any,
    prompts: list[np.ndarray],
    *,
    new_tokens: int,
    temperature: float = 0.8,
    seed: int = 0,
) -> list[np.ndarray]:
    """Continue each prompt by ``new_tokens`` tokens with a KV cache (see ``Generator``)."""
    return Generator(model, plan).generate(params, prompts, new_tokens=new_tokens, temperature=temperature, seed=seed)
