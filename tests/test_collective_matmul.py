"""Collective matmuls: each equals the plain sharded matmul (all-gather then matmul, matmul then
reduce-scatter) forward and in gradients, and compiles to n-1 collective-permutes and no other
collective.

Shapes are tiny and non-square: on n devices each device holds a (3, 5) row block of x and a
(5, 7) column block of w for the all-gather matmul, and (3n, 5) and (5, 7) feature shards for
the reduce-scatter matmul, over a 1-D ``tensor`` axis of the 8 simulated CPU devices. The CPU backend emits synchronous
``collective-permute`` ops (no ``-start``/``-done`` pairs); the count takes either form once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import mlsys_jax as mj
from mlsys_jax.comm.collective_matmul import all_gather_matmul, matmul_reduce_scatter

AXIS = "tensor"
ROWS_PER_DEVICE, K, F = 3, 5, 7  # per-device row block, and a per-device width unit
OTHER_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
Fn = Callable[[jax.Array, jax.Array], jax.Array]


def ring_ag(x: jax.Array, w: jax.Array) -> jax.Array:
    return all_gather_matmul(x, w, AXIS)


def plain_ag(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.all_gather(x, AXIS, tiled=True) @ w


def ring_rs(x: jax.Array, w: jax.Array) -> jax.Array:
    return matmul_reduce_scatter(x, w, AXIS)


def plain_rs(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.psum_scatter(x @ w, AXIS, scatter_dimension=0, tiled=True)


# kind -> (ring, plain, x spec, w spec, out spec, global x shape, global w shape) for n devices
def layout(kind: str, n: int) -> tuple[Fn, Fn, P, P, P, tuple[int, int], tuple[int, int]]:
    m = ROWS_PER_DEVICE * n
    if kind == "all_gather_matmul":  # x rows sharded, w columns sharded
        return ring_ag, plain_ag, P(AXIS, None), P(None, AXIS), P(None, AXIS), (m, K), (K, F * n)
    # features sharded: x columns, w rows; output rows scattered
    return ring_rs, plain_rs, P(None, AXIS), P(AXIS, None), P(AXIS, None), (m, K * n), (K * n, F)


@functools.cache
def setup(kind: str, n: int) -> tuple[Fn, Fn, jax.Array, jax.Array]:
    """The ring and plain versions as jitted global functions, and random global inputs."""
    ring, plain, x_spec, w_spec, out_spec, x_shape, w_shape = layout(kind, n)
    mesh = mj.make_mesh({AXIS: n}, devices=jax.devices()[:n])

    def wrap(f: Fn) -> Fn:
        return jax.shard_map(f, mesh=mesh, in_specs=(x_spec, w_spec), out_specs=out_spec)

    kx, kw = jax.random.split(jax.random.key(n))
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    return wrap(ring), wrap(plain), x, w


def loss(f: Fn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return lambda x, w: jnp.sum(f(x, w) ** 2)


def collective_counts(f: Callable[..., object], x: jax.Array, w: jax.Array) -> dict[str, int]:
    """How many of each collective the compiled ``f(x, w)`` holds."""
    hlo = jax.jit(f).lower(x, w).compile().as_text()
    assert hlo is not None
    found = re.findall(r"\b(collective-permute|all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", hlo)
    return {kind: found.count(kind) for kind in ("collective-permute", *OTHER_COLLECTIVES)}


KINDS = ("all_gather_matmul", "matmul_reduce_scatter")


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_ring_matmul_equals_plain_sharded_matmul(devices, kind, n):
    ring, plain, x, w = setup(kind, n)
    got, want = jax.jit(ring)(x, w), jax.jit(plain)(x, w)
    assert got.shape == want.shape
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_ring_matmul_gradients_equal_plain_gradients(devices, kind, n):
    ring, plain, x, w = setup(kind, n)
    got = jax.jit(jax.grad(loss(ring), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(x, w)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_ring_matmul_holds_n_minus_1_permutes_and_no_other_collective(devices, kind, n):
    ring, plain, x, w = setup(kind, n)
    counts = collective_counts(ring, x, w)
    assert counts == {"collective-permute": n - 1, **dict.fromkeys(OTHER_COLLECTIVES, 0)}
    if n > 1:  # the plain version does use the collective the ring replaces
        plain_counts = collective_counts(plain, x, w)
        assert plain_counts["collective-permute"] == 0
        assert plain_counts["all-gather" if kind == "all_gather_matmul" else "reduce-scatter"] >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_ring_matmul_gradient_holds_only_permutes(devices, kind):
    """The backward pass reruns the forward ring and adds its transpose, a reverse ring."""
    n = 4
    ring, _, x, w = setup(kind, n)
    counts = collective_counts(jax.grad(loss(ring), argnums=(0, 1)), x, w)
    assert counts == {"collective-permute": 2 * (n - 1), **dict.fromkeys(OTHER_COLLECTIVES, 0)}


def test_ring_matmul_keeps_a_narrow_float_dtype(devices):
    ring, plain, x, w = setup("matmul_reduce_scatter", 4)
    got = jax.jit(ring)(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(jax.jit(plain)(x, w)), rtol=5e-2, atol=2e-1)
    ring, plain, x, w = setup("all_gather_matmul", 4)
    assert jax.jit(ring)(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("fn", [all_gather_matmul, matmul_reduce_scatter])
def test_ring_matmul_rejects_mismatched_or_non_2d_operands(devices, fn):
    mesh = mj.make_mesh({AXIS: 2}, devices=jax.devices()[:2])
    for x, w in ((jnp.ones((4, 3)), jnp.ones((5, 2))), (jnp.ones((2, 4, 3)), jnp.ones((3, 2)))):
        mapped = jax.shard_map(lambda a, b: fn(a, b, AXIS), mesh=mesh, in_specs=(P(), P()), out_specs=P())
        with pytest.raises(ValueError, match=fn.__name__):
            jax.eval_shape(mapped, x, w)
