"""``linear_cross_entropy``: the LM-head matmul and the cross-entropy fused, forward and backward.

    loss_t = lse_t - logit_t[label_t] + z_loss * lse_t^2,   logits = hidden @ weight (fp32)

The unfused reference builds the whole (tokens, vocab) logits array, which for a 32k-128k vocab
is the largest activation of a language model; the fused backends never do. The family's layout:
``reference`` (the specification in two pieces, ``logits`` and ``token_losses``, and the ``xla``
backend), ``fused`` (a vocab-parallel ``custom_vjp`` from two chunked primitives), one module per
fused backend (``chunked``, ``triton``, ``tpu``; each with its block defaults and tuning
candidates), ``tiles`` (what the Pallas lowerings share) and ``options``.
``LINEAR_CROSS_ENTROPY`` is the explicit backend table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.autotune import resolve_blocks
from mlsys_jax.kernels.cross_entropy import chunked, reference, tpu, triton
from mlsys_jax.kernels.cross_entropy.chunked import chunked_grads, chunked_stats
from mlsys_jax.kernels.cross_entropy.fused import fused_vjp
from mlsys_jax.kernels.cross_entropy.options import FLOAT_DTYPES, LossBlocks, LossOptions
from mlsys_jax.kernels.cross_entropy.reference import (
    linear_cross_entropy_reference,
    log_probabilities,
    logits,
    token_losses,
)
from mlsys_jax.kernels.dispatch import Registry

__all__ = [
    "LINEAR_CROSS_ENTROPY",
    "LossBlocks",
    "LossOptions",
    "choose",
    "chunked_grads",
    "chunked_stats",
    "fused_vjp",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "log_probabilities",
    "logits",
    "token_losses",
]

LINEAR_CROSS_ENTROPY = Registry(
    "linear_cross_entropy",
    order={
        "gpu": ("pallas_triton", "chunked", "xla"),
        "tpu": ("pallas_tpu", "chunked", "xla"),
        "cpu": ("chunked", "xla"),
    },
    backends=(reference.BACKEND, chunked.BACKEND, triton.BACKEND, tpu.BACKEND),
)


# --- the public function ------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, ignore_index, z_loss, vocab_axis) -> tuple[str, ...] | None:
    where = "linear_cross_entropy"
    if hidden.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"{where}: hidden must be (..., D) and weight (D, V); got shapes {hidden.shape} and {weight.shape}"
        )
    if weight.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"{where}: weight {weight.shape} must be (D, V) with D = hidden.shape[-1] = "
            f"{hidden.shape[-1]}. Fix: pass the LM head as (d_model, vocab) (transpose an "
            "embedding table first)."
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{where}: labels {labels.shape} must have hidden's leading shape {hidden.shape[:-1]}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"{where}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{where}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share "
            "a dtype. Fix: cast the weight to the activations' dtype."
        )
    if not isinstance(ignore_index, int):
        raise ValueError(f"{where}: ignore_index must be a Python int, got {ignore_index!r}")  # noqa: TRY004 - all checks raise ValueError
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"{where}: z_loss must be a non-negative Python float, got {z_loss!r}")
    if vocab_axis is None:
        return None
    return (vocab_axis,) if isinstance(vocab_axis, str) else tuple(vocab_axis)


def choose(
    hidden: jax.Array | jax.ShapeDtypeStruct,
    weight: jax.Array | jax.ShapeDtypeStruct,
    *,
    implementation: str | None = None,
    vocab_axis: Any = None,
):
    """The backend ``linear_cross_entropy`` would run for these arguments (see ``Choice.describe``)."""
    return LINEAR_CROSS_ENTROPY.choose(
        implementation,
        dtype=hidden.dtype,
        d_model=hidden.shape[-1],
        vocab=weight.shape[-1],
        vocab_parallel=vocab_axis is not None,
    )


def linear_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    implementation: str | None = None,
    blocks: LossBlocks | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Per-token cross-entropy of ``hidden @ weight`` against ``labels``, fp32, shape labels.shape.

    hidden (..., D) and weight (D, V) share a float dtype; labels (...) are ints. Tokens labelled
    ``ignore_index`` give 0 and no gradient. ``z_loss`` adds z_loss * lse^2. ``vocab_axis`` (inside
    ``jax.shard_map``) says ``weight`` is this shard's contiguous vocabulary slice along that mesh
    axis (or axes). ``implementation``: None picks the best backend here ("chunked" on CPU),
    "pallas" the best Pallas one, or a name ("xla", "chunked", "pallas_triton", "pallas_tpu").
    """
    axis = _check_inputs(hidden, weight, labels, ignore_index, z_loss, vocab_axis)
    choice = choose(hidden, weight, implementation=implementation, vocab_axis=axis)
    if blocks is None:
        blocks = resolve_blocks("linear_cross_entropy", choice.backend, hidden, weight)
    opts = LossOptions(ignore_index=ignore_index, z_loss=float(z_loss), vocab_axis=axis, blocks=blocks or LossBlocks())
    return choice(hidden, weight, labels.astype(jnp.int32), opts)
