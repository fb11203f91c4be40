"""What a serving choice costs in quality: the validation loss of a model as served, through the
training forward or teacher-forced through a paged KV cache of a given kind.

Through the cache, each row's tokens are fed ``chunk`` at a time at their positions, written into
the row's own blocks and attended over from there, exactly as the engine feeds a prompt (chunks)
or a generated token (``chunk=1``): an int8 cache's keys are quantized and requantized as they
would be while serving, and every query reads them back through the pages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.models import base
from mlsys_jax.models.base import LanguageModel, PagedKV
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.serve.engine import KVCache, make_pools
from mlsys_jax.serve.kv_blocks import TRASH

Path = Literal["forward"] | KVCache


def validation_loss(
    model: LanguageModel,
    plan: Plan,
    params: Any,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    through: Path = "forward",
    block_size: int = 16,
    chunk: int = 1,
) -> float:
    """Mean next-token loss over ``batches`` (``inputs``, ``targets``, ``mask``, (batch, seq)).

    ``through="forward"``: the training forward, no cache. ``"auto"`` or ``"int8"``: teacher-forced
    through a paged KV cache of that kind, ``chunk`` tokens per call (it must divide seq).
    """
    layout = plan.layout
    forward = jax.jit(lambda p, b: base.loss_sums(model, p, b, layout))
    head = jax.jit(lambda p, x, t, m: model.loss(p, x, t, m, layout))

    def step(params, k, v, tokens, positions, slots, tables, lengths):
        x, cache = base.extend(model, params, tokens, positions, PagedKV(k, v, tables, slots, lengths), layout)
        return x, cache.k, cache.v

    paged = jax.jit(step, donate_argnums=(1, 2))
    total, count = 0.0, 0.0
    for batch in batches:
        if through == "forward":
            s, n = forward(params, {k: batch[k] for k in ("inputs", "targets", "mask")})
        else:
            x = _paged_hidden(model, plan, params, paged, batch["inputs"], through, block_size, chunk)
            s, n = head(params, x, batch["targets"], batch["mask"])
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _paged_hidden(
    model: LanguageModel,
    plan: Plan,
    params: Any,
    step: Any,
    inputs: np.ndarray,
    kv_cache: KVCache,
    block_size: int,
    chunk: int,
) -> jax.Array:
    """The residual stream of every position, fed ``chunk`` tokens at a time through the pages."""
    rows, seq = inputs.shape
    if seq % chunk:
        raise ValueError(f"chunk {chunk} must divide the sequence length {seq}")
    per_row = math.ceil(seq / block_size)
    (k, v), _ = make_pools(model, plan, TRASH + 1 + rows * per_row, block_size, kv_cache)
    tables = TRASH + 1 + np.arange(rows * per_row, dtype=np.int32).reshape(rows, per_row)
    hidden = []
    for start in range(0, seq, chunk):
        pos = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (rows, chunk))
        slots = np.take_along_axis(tables, pos // block_size, axis=1) * block_size + pos % block_size
        lengths = np.full((rows,), start + chunk, np.int32)
        x, k, v = step(params, k, v, inputs[:, start : start + chunk], pos, slots, tables, lengths)
        hidden.append(x)
    return jnp.concatenate(hidden, axis=1)
