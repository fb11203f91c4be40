"""What the runtime needs from a model: its parameter specs and a pure forward function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from mlsys_jax.train.loss import cross_entropy_sums

Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A next-token model as data: the runtime trains and samples it without knowing its family.

    ``apply(params, tokens, constrain)`` maps int tokens (batch, seq) to fp32 logits
    (batch, seq, vocab); ``flops_per_token(seq_len)`` counts model FLOPs for MFU. With a
    ``compute_dtype`` the runtime hands ``apply`` parameters already cast to it, each cast kept
    in its parameter's sharding so that gathers move the narrow copy (the fp32 master weights
    stay in the train state). ``loss(params, inputs, targets, mask, constrain)``, when given,
    returns the (loss sum, token count) pair directly, e.g. through a fused kernel.
    """

    name: str
    specs: Any
    apply: Callable[[Any, jax.Array, Constrain], jax.Array]
    flops_per_token: Callable[[int], float]
    vocab_size: int
    config: Any = None
    compute_dtype: Any = None
    loss: Callable[[Any, jax.Array, jax.Array, jax.Array, Constrain], tuple[jax.Array, jax.Array]] | None = None


def next_token_loss_sums(model: LanguageModel, params: Any, batch: dict[str, jax.Array],
                         constrain: Constrain) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, token count) of a batch: the model's own fused loss when it has
    one (it never forms the whole logits), else cross-entropy of ``apply``'s logits."""
    if model.loss is not None:
        return model.loss(params, batch["inputs"], batch["targets"], batch["mask"], constrain)
    return cross_entropy_sums(model.apply(params, batch["inputs"], constrain), batch["targets"], batch["mask"])
