"""What the runtime needs from a model: its parameter specs and a pure forward function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A next-token model as data: the runtime trains and samples it without knowing its family.

    ``apply(params, tokens, constrain)`` maps int tokens (batch, seq) to fp32 logits
    (batch, seq, vocab); ``flops_per_token(seq_len)`` counts model FLOPs for MFU. With a
    ``compute_dtype`` the runtime hands ``apply`` parameters already cast to it, each cast kept
    in its parameter's sharding so that gathers move the narrow copy (the fp32 master weights
    stay in the train state).
    """

    name: str
    specs: Any
    apply: Callable[[Any, jax.Array, Constrain], jax.Array]
    flops_per_token: Callable[[int], float]
    vocab_size: int
    config: Any = None
    compute_dtype: Any = None
