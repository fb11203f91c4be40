"""The model's hot operations through ``mlsys_jax.kernels``, chosen by the config's ``*_impl``.

"xla" keeps the plain jnp layers that XLA partitions by itself. Any other choice runs a kernel;
when the ``constrain`` hook is a plan (it has a ``mesh`` and an ``activation_spec``), the kernel
runs per shard of the activations' placement, so switching kernels never changes the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels import sharding
from mlsys_jax.kernels.attention import flash_attention
from mlsys_jax.kernels.cross_entropy import linear_cross_entropy
from mlsys_jax.kernels.norms import rms_norm as fused_rms_norm
from mlsys_jax.models.layers import ATTENTION, Constrain, rms_norm

IGNORE = -1  # label of tokens the mask leaves out (never a vocabulary id)


def _layout(constrain: Constrain) -> tuple[Any, Callable[..., Any]] | None:
    mesh = getattr(constrain, "mesh", None)
    spec = getattr(constrain, "activation_spec", None)
    if mesh is None or spec is None:
        return None
    return mesh, spec


def _backend(impl: str, auto: str) -> str | None:
    return None if impl == auto else impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, constrain: Constrain) -> jax.Array:
    """Causal grouped-query attention of (batch, seq, heads, head_dim) q and (…, kv_heads, …) k, v."""
    if impl in ATTENTION:
        return ATTENTION[impl](q, k, v, causal=True)
    implementation = _backend(impl, "auto")
    layout = _layout(constrain)
    if layout is None:
        return flash_attention(q, k, v, causal=True, implementation=implementation)
    mesh, spec = layout
    return sharding.sharded_flash_attention(
        q, k, v, mesh=mesh, causal=True, implementation=implementation,
        q_spec=spec(("batch", "seq", "heads", "head_dim"), q.shape, "attention queries"),
        kv_spec=spec(("batch", "seq", "kv_heads", "head_dim"), k.shape, "attention keys"),
    )


def norm(x: jax.Array, weight: jax.Array, eps: float, impl: str, constrain: Constrain) -> jax.Array:
    """RMSNorm of (batch, seq, embed) activations."""
    if impl == "xla":
        return rms_norm(x, weight, eps)

    def run(x: jax.Array, w: jax.Array) -> jax.Array:
        return fused_rms_norm(x, w, eps=eps, implementation=impl)

    layout = _layout(constrain)
    if layout is None:
        return run(x, weight)
    mesh, spec = layout
    return sharding.sharded_rows(run, x, weight, mesh=mesh,
                                 x_spec=spec(("batch", "seq", "embed"), x.shape, "norm input"))


def next_token_loss(x: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, impl: str,
                    constrain: Constrain) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of cross-entropy of ``x @ head`` against targets where mask is set, through a
    fused linear cross-entropy that never forms the (tokens, vocab) logits."""
    labels = jnp.where(mask > 0, targets, IGNORE)
    implementation = _backend(impl, "fused")

    def run(h: jax.Array, w: jax.Array, y: jax.Array, vocab_axis: Any = None) -> jax.Array:
        return linear_cross_entropy(h, w, y, ignore_index=IGNORE, implementation=implementation,
                                    vocab_axis=vocab_axis)

    layout = _layout(constrain)
    if layout is None:
        losses = run(x, head, labels)
    else:
        mesh, spec = layout
        logits_spec = spec(("batch", "seq", "vocab"), (*labels.shape, head.shape[1]), "logits")
        vocab = tuple(logits_spec)[2] if len(tuple(logits_spec)) > 2 else None
        losses = sharding.sharded_token_loss(
            run, x, head, labels, mesh=mesh, token_spec=spec(("batch", "seq"), labels.shape, "tokens"),
            vocab_axes=sharding.mesh_axes(vocab),
        )
    return jnp.sum(losses), jnp.sum(mask.astype(jnp.float32))


def kernel_choices(cfg: Any, batch: int, seq: int) -> dict[str, str]:
    """Which backend each hot operation of a Llama config runs here, and why others were passed
    over (empty for the plain XLA layers)."""
    from mlsys_jax.kernels import attention as attention_kernels, cross_entropy, norms

    dt = jnp.dtype(cfg.dtype)
    out: dict[str, str] = {}
    if cfg.attention_impl not in ATTENTION:
        q = jax.ShapeDtypeStruct((batch, seq, cfg.n_heads, cfg.head_dim), dt)
        k = jax.ShapeDtypeStruct((batch, seq, cfg.n_kv_heads, cfg.head_dim), dt)
        out["attention"] = attention_kernels.choose(
            q, k, causal=True, implementation=_backend(cfg.attention_impl, "auto")).describe()
    if cfg.norm_impl != "xla":
        x = jax.ShapeDtypeStruct((batch, seq, cfg.d_model), dt)
        out["rms_norm"] = norms.choose("rms_norm", x, cfg.norm_impl).describe()
    if cfg.loss_impl != "xla":
        h = jax.ShapeDtypeStruct((batch * seq, cfg.d_model), dt)
        w = jax.ShapeDtypeStruct((cfg.d_model, cfg.vocab_size), dt)
        out["loss"] = cross_entropy.choose(h, w, implementation=_backend(cfg.loss_impl, "fused")).describe()
    return out
