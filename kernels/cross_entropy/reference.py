"""The LM head and cross-entropy in plain jnp: the specification of every backend of
``linear_cross_entropy``, and its ``xla`` backend.

    logits = hidden @ weight (fp32),   loss_t = lse_t - logit_t[label_t] + z_loss * lse_t^2

It comes in two pieces, ``logits`` and ``token_losses``, so a model can place the logits between
them (its plan's sharding constraint) and still use this one reference. ``logits`` returns fp32
(a softmax over a large vocabulary wants the precision) while its backward pass works in the
inputs' dtype like any other matmul, so the weight's gradient is reduced across devices in the
compute dtype. The label's logit is read with a one-hot product rather than a gather, which
partitions cleanly when the vocabulary is sharded.

Labels equal to ``ignore_index`` give loss 0 and no gradient. Any other label outside [0, V)
cannot be caught at trace time; it is treated as having logit 0 (loss = lse + z_loss * lse^2,
gradient = the softmax), the same in every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax.kernels.cross_entropy.options import LossOptions, dtype_check
from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.vma import sum_to_vma_of


@jax.custom_vjp
def logits(hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """hidden (..., D) @ weight (D, V) in fp32; the backward pass in hidden's dtype."""
    return jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)


def _logits_fwd(hidden: jax.Array, weight: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return logits(hidden, weight), (hidden, weight)


def _logits_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden, weight = res
    g = g.astype(hidden.dtype)
    dh = jnp.einsum("...v,dv->...d", g, weight)
    dw = jnp.einsum("...d,...v->dv", hidden, g).astype(weight.dtype)
    # Inside a checked shard_map, sum over the mesh axes a primal does not vary over (dh over a
    # split vocabulary, dw over the token shards), as autodiff of a plain matmul would.
    return sum_to_vma_of(dh, hidden), sum_to_vma_of(dw, weight)


logits.defvjp(_logits_fwd, _logits_bwd)


def vocab_offset(vocab_local: int, vocab_axis: tuple[str, ...] | None) -> jax.Array | int:
    """The first vocabulary id of this shard (0 without a vocabulary axis)."""
    return 0 if vocab_axis is None else lax.axis_index(vocab_axis) * vocab_local


def token_losses(logits: jax.Array, labels: jax.Array, opts: LossOptions = LossOptions()) -> jax.Array:
    """Per-token loss, labels' shape, fp32, from fp32 logits (..., V) (this shard's vocabulary
    slice when ``opts.vocab_axis`` is set, inside ``jax.shard_map``)."""
    vocab = logits.shape[-1]
    local = labels - vocab_offset(vocab, opts.vocab_axis)
    label_logit = jnp.sum(logits * jax.nn.one_hot(local, vocab, dtype=logits.dtype), axis=-1)
    if opts.vocab_axis is None:
        lse = jax.nn.logsumexp(logits, axis=-1)
    else:
        m = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=-1)), opts.vocab_axis)
        lse = m + jnp.log(lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), opts.vocab_axis))
        label_logit = lax.psum(label_logit, opts.vocab_axis)
    loss = lse - label_logit + opts.z_loss * lse**2
    return jnp.where(labels == opts.ignore_index, 0.0, loss)


def log_probabilities(logits: jax.Array) -> jax.Array:
    """log softmax over the last axis in fp32: the distribution the loss scores, for sampling
    and for reporting a token's log-probability."""
    logits = logits.astype(jnp.float32)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def linear_cross_entropy_reference(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array, opts: LossOptions = LossOptions()
) -> jax.Array:
    """Per-token loss (labels' shape) fp32 from the whole fp32 logits of hidden (..., D) and
    weight (D, V)."""
    return token_losses(logits(hidden, weight), labels, opts)


BACKEND = Backend("xla", ("cpu", "gpu", "tpu"), linear_cross_entropy_reference, dtype_check)
