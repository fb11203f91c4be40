"""Kernels under a mesh run per shard: the same values and gradients as on one device, and the
compiled program gathers nothing (the only collectives are the reductions the math needs)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mlsys_jax as mj
from mlsys_jax.analysis import collectives
from mlsys_jax.kernels import AttentionBlocks, LossBlocks, NormBlocks
from mlsys_jax.kernels.attention import flash_attention
from mlsys_jax.kernels.cross_entropy import linear_cross_entropy
from mlsys_jax.kernels.norms import rms_norm
from mlsys_jax.kernels.sharding import sharded_flash_attention, sharded_rows, sharded_token_loss

ATTENTION_IMPLS = ["xla", "pallas_triton", "pallas_tpu"]


@pytest.fixture(scope="module")
def mesh(devices):
    return mj.make_mesh(data=2, fsdp=2, tensor=2)


def put(mesh, x, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def gathers(fn, *args):
    """The all-gathers in the compiled program of ``fn(*args)``."""
    return [c for c in collectives(jax.jit(fn).lower(*args).compile()) if c.kind == "all-gather"]


def grads_of(fn, argnums):
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=argnums)


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("kv_split", [True, False], ids=["kv_heads_split", "kv_heads_whole"])
def test_attention_per_batch_and_head_shard_matches_one_device(mesh, impl, kv_split):
    b, s, h, kv, d = 4, 16, 4, 2, 64
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, s, h, d))
    k = jax.random.normal(keys[1], (b, s, kv, d))
    v = jax.random.normal(keys[2], (b, s, kv, d))
    batch = ("data", "fsdp")
    kv_heads = "tensor" if kv_split else None
    qs, ks, vs = (
        put(mesh, q, batch, None, "tensor"),
        put(mesh, k, batch, None, kv_heads),
        put(mesh, v, batch, None, kv_heads),
    )
    blocks = AttentionBlocks(16, 16, 16, 16)
    local = functools.partial(flash_attention, causal=True, implementation=impl, blocks=blocks)
    sharded = functools.partial(
        sharded_flash_attention,
        mesh=mesh,
        q_spec=P(batch, None, "tensor"),
        kv_spec=P(batch, None, kv_heads),
        causal=True,
        implementation=impl,
        blocks=blocks,
    )
    np.testing.assert_allclose(sharded(qs, ks, vs), local(q, k, v), rtol=2e-5, atol=2e-5)
    for got, want in zip(grads_of(sharded, (0, 1, 2))(qs, ks, vs), grads_of(local, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert gathers(grads_of(sharded, (0, 1, 2)), qs, ks, vs) == []


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_rms_norm_per_row_shard_matches_one_device(mesh, impl):
    x = jax.random.normal(jax.random.key(1), (4, 8, 128))
    w = 1.0 + 0.1 * jax.random.normal(jax.random.key(2), (128,))
    xs, ws = put(mesh, x, ("data", "fsdp"), "tensor"), put(mesh, w)
    local = functools.partial(rms_norm, implementation=impl, blocks=NormBlocks(block_rows=8))
    sharded = lambda x, w: sharded_rows(local, x, w, mesh=mesh, x_spec=P(("data", "fsdp"), "tensor"))
    np.testing.assert_allclose(sharded(xs, ws), local(x, w), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_of(sharded, (0, 1))(xs, ws), grads_of(local, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert gathers(grads_of(sharded, (0, 1)), xs, ws) == []


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas_triton"])
def test_loss_per_token_shard_with_the_vocabulary_split_matches_one_device(mesh, impl):
    t, d, vocab = 32, 64, 512
    h = jax.random.normal(jax.random.key(3), (4, t // 4, d))
    w = jax.random.normal(jax.random.key(4), (d, vocab)) * d**-0.5
    y = jax.random.randint(jax.random.key(5), (4, t // 4), 0, vocab).at[0, 0].set(-1)
    hs, ws, ys = put(mesh, h, ("data", "fsdp")), put(mesh, w, None, "tensor"), put(mesh, y, ("data", "fsdp"))
    run = functools.partial(
        linear_cross_entropy, ignore_index=-1, implementation=impl, blocks=LossBlocks(block_tokens=16, block_vocab=128)
    )
    sharded = lambda h, w, y: sharded_token_loss(
        run, h, w, y, mesh=mesh, token_spec=P(("data", "fsdp")), vocab_axes=("tensor",)
    )
    np.testing.assert_allclose(sharded(hs, ws, ys), run(h, w, y), rtol=1e-5, atol=1e-5)
    total = lambda f: jax.grad(lambda h, w, y: jnp.sum(f(h, w, y)), argnums=(0, 1))
    for got, want in zip(total(sharded)(hs, ws, ys), total(run)(h, w, y)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert gathers(total(sharded), hs, ws, ys) == []
