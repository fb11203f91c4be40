"""A model's hot operations through the kernel API, chosen by name and placed by its layout.

Every implementation is the kernels' own: ``"xla"`` calls the kernel family's jnp reference as
plain jnp, outside any ``shard_map``, so XLA partitions it as it would any model code; any other
choice names a backend (or ``"pallas"``, ``"auto"``/``"fused"`` for the kernels' own pick) and,
under a sharded layout, runs per shard of the activations' placement, with the plan's mesh and
activation specs handed over explicitly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels import attention as attention_kernels
from mlsys_jax.kernels import cross_entropy, norms, sharding
from mlsys_jax.kernels import paged_attention as paged_kernels
from mlsys_jax.models.base import Layout, PagedKV

IGNORE = -1  # label of tokens the mask leaves out (never a vocabulary id)
Q_AXES = ("batch", "seq", "heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
PAGE_AXES = (None, None, "kv_heads", "head_dim")


def _backend(impl: str, auto: str) -> str | None:
    return None if impl == auto else impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    impl: str,
    layout: Layout,
    *,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Causal grouped-query attention of (batch, seq, heads, head_dim) q and (…, kv_heads, …)
    k, v; with a cache, queries sit at ``q_offset`` (batch,) and keys past ``kv_lengths`` are
    hidden; with a ``window``, keys that many positions back or more are hidden too."""
    kwargs = {"causal": True, "q_offset": q_offset, "kv_lengths": kv_lengths, "sliding_window": window}
    if impl == "xla" or not layout.sharded:
        return attention_kernels.flash_attention(q, k, v, implementation=_backend(impl, "auto"), **kwargs)
    assert layout.spec is not None
    return sharding.sharded_flash_attention(
        q,
        k,
        v,
        mesh=layout.mesh,
        implementation=_backend(impl, "auto"),
        q_spec=layout.spec(Q_AXES, q.shape, "attention queries"),
        kv_spec=layout.spec(KV_AXES, k.shape, "attention keys"),
        **kwargs,
    )


def paged_attention(
    q: jax.Array, cache: PagedKV, q_offset: jax.Array, impl: str, layout: Layout, *, window: int | None = None
) -> jax.Array:
    """Causal grouped-query attention of (batch, seq, heads, head_dim) queries at ``q_offset``
    over one layer's paged keys and values. ``"xla"`` is the kernels' reference, which XLA
    partitions (the pools are split by K/V heads like the queries by heads); any other choice
    runs per shard of heads."""
    kwargs = {"sliding_window": window, "implementation": _backend(impl, "auto")}
    if impl == "xla" or not layout.sharded:
        return paged_kernels.paged_attention(
            q, cache.k, cache.v, cache.block_tables, cache.lengths, q_offset=q_offset, **kwargs
        )
    assert layout.spec is not None
    pool_shape = cache.k.values.shape if isinstance(cache.k, paged_kernels.Int8Pages) else cache.k.shape
    return sharding.sharded_paged_attention(
        q,
        cache.k,
        cache.v,
        cache.block_tables,
        cache.lengths,
        q_offset,
        mesh=layout.mesh,
        q_spec=layout.spec(Q_AXES, q.shape, "attention queries"),
        pages_spec=layout.spec(PAGE_AXES, pool_shape, "kv cache pages"),
        **kwargs,
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, impl: str, layout: Layout) -> jax.Array:
    """RMSNorm of (batch, seq, embed) activations."""

    def run(x: jax.Array, w: jax.Array) -> jax.Array:
        return norms.rms_norm(x, w, eps=eps, implementation=impl)

    if impl == "xla" or not layout.sharded:
        return run(x, weight)
    assert layout.spec is not None
    return sharding.sharded_rows(
        run, x, weight, mesh=layout.mesh, x_spec=layout.spec(("batch", "seq", "embed"), x.shape, "norm input")
    )


def logits(x: jax.Array, head: jax.Array, layout: Layout) -> jax.Array:
    """fp32 logits (batch, seq, vocab) of x @ head, placed by the layout (the kernels'
    reference LM head: its backward works in x's dtype)."""
    return layout.constrain(cross_entropy.logits(x, head), ("batch", "seq", "vocab"))


def next_token_loss(
    x: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array, impl: str, layout: Layout
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of cross-entropy of ``x @ head`` against targets where mask is set. "xla"
    forms the whole logits (the reference, in its two pieces); any other choice is a fused
    linear cross-entropy that never does."""
    labels = jnp.where(mask > 0, targets, IGNORE)
    count = jnp.sum(mask.astype(jnp.float32))
    if impl == "xla":
        losses = cross_entropy.token_losses(
            logits(x, head, layout), labels, cross_entropy.LossOptions(ignore_index=IGNORE)
        )
        return jnp.sum(losses), count

    def run(h: jax.Array, w: jax.Array, y: jax.Array, vocab_axis: Any = None) -> jax.Array:
        return cross_entropy.linear_cross_entropy(
            h, w, y, ignore_index=IGNORE, vocab_axis=vocab_axis, implementation=_backend(impl, "fused")
        )

    if not layout.sharded:
        return jnp.sum(run(x, head, labels)), count
    assert layout.spec is not None
    logits_spec = layout.spec(("batch", "seq", "vocab"), (*labels.shape, head.shape[1]), "logits")
    vocab = tuple(logits_spec)[2] if len(tuple(logits_spec)) > 2 else None
    losses = sharding.sharded_token_loss(
        run,
        x,
        head,
        labels,
        mesh=layout.mesh,
        vocab_axes=sharding.mesh_axes(vocab),
        token_spec=layout.spec(("batch", "seq"), labels.shape, "tokens"),
    )
    return jnp.sum(losses), count


def kernel_choices(
    dtype: Any,
    *,
    attention: tuple[str, tuple, tuple, int | None] | None = None,
    norm: tuple[str, tuple] | None = None,
    loss: tuple[str, tuple, tuple] | None = None,
    tp_matmul: str = "xla",
) -> dict[str, str]:
    """Which backend each hot operation runs here, and why others were passed over, for the
    operations that run a kernel: ``attention=(impl, q_shape, k_shape, window)``, ``norm=(impl,
    x_shape)``, ``loss=(impl, hidden_shape, head_shape)``, ``tp_matmul`` the tensor-parallel
    projections' choice. Plain "xla" operations are left out."""
    dt = jnp.dtype(dtype)
    out: dict[str, str] = {}
    if attention is not None and attention[0] != "xla":
        impl, q, k, window = attention
        out["attention"] = attention_kernels.choose(
            jax.ShapeDtypeStruct(q, dt),
            jax.ShapeDtypeStruct(k, dt),
            causal=True,
            sliding_window=window,
            implementation=_backend(impl, "auto"),
        ).describe()
    if norm is not None and norm[0] != "xla":
        out["rms_norm"] = norms.choose("rms_norm", jax.ShapeDtypeStruct(norm[1], dt), norm[0]).describe()
    if loss is not None and loss[0] != "xla":
        impl, h, w = loss
        out["loss"] = cross_entropy.choose(
            jax.ShapeDtypeStruct(h, dt), jax.ShapeDtypeStruct(w, dt), implementation=_backend(impl, "fused")
        ).describe()
    if tp_matmul == "collective":
        out["tp_matmul"] = (
            "collective (ppermute rings over 'tensor' with the sequence split; einsums where the layout "
            "is unsharded, tensor is 1 or does not divide the sequence, heads, kv_heads and mlp)"
        )
    return out
