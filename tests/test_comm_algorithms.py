"""All-reduce algorithms from point-to-point sends: each equals ``lax.psum``, compiles to
collective-permutes only, in the number its step structure predicts, and its cost-table row
matches hand-computed steps and bytes.

Every case compiles once (cached) on a 1-D or 2-D mesh of the 8 simulated CPU devices; the
per-device block is (1, 5, 7) (or (5, 7) gradients for the parameter server), 35 elements, so
every n > 1 pads. The CPU backend emits synchronous ``collective-permute`` ops (no
``-start``/``-done`` pairs); the count below takes either form once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import mlsys_jax as mj
from mlsys_jax import comm

BLOCK = (5, 7)
DTYPES = ("int32", "float32")
OTHER_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Case:
    """One algorithm on one mesh; ``inner`` is the fsdp axis size (hierarchical) or the devices
    per slice of the one data axis (sliced)."""

    algorithm: str
    n: int
    buckets: int = 1
    inner: int | None = None

    @property
    def id(self) -> str:
        shape = f"{self.inner}x{self.n // self.inner}" if self.inner else f"n{self.n}"
        return f"{self.algorithm}-{shape}" + (f"-b{self.buckets}" if self.buckets > 1 else "")

    @property
    def sizes(self) -> dict[str, int]:
        if self.inner and self.algorithm == "hierarchical":
            return {"data": self.n // self.inner, "fsdp": self.inner}
        return {"data": self.n}

    def permutes(self) -> int:
        """The expected collective-permute count, from each algorithm's step structure."""
        n, log2 = self.n, int(math.log2(self.n))
        if self.algorithm == "ring":
            return 2 * (n - 1) * self.buckets
        if self.algorithm == "halving_doubling":
            return 2 * log2 + (0 if 2**log2 == n else 2)
        if self.algorithm in ("hierarchical", "sliced"):
            assert self.inner
            return 2 * (self.inner - 1) + 2 * (n // self.inner - 1)
        return 2 * (n - 1)  # parameter_server: n-1 pushes, n-1 pulls


def sgd(params: jax.Array, grad_sum: jax.Array) -> jax.Array:
    """An elementwise update whose weakly typed step keeps int32 and float32 dtypes."""
    return params - 2 * grad_sum


SIZES = (1, 2, 3, 4, 6, 8)
CASES = [
    *(Case("ring", n, buckets) for n in SIZES for buckets in (1, 3)),
    *(Case("halving_doubling", n) for n in SIZES),
    *(Case("hierarchical", inner * outer, inner=inner) for inner, outer in ((2, 2), (2, 3), (3, 2), (2, 4), (4, 2))),
    *(Case("sliced", inner * outer, inner=inner) for inner, outer in ((2, 2), (2, 3), (3, 2), (2, 4), (4, 2))),
    *(Case("parameter_server", n) for n in SIZES),
]


def body(case: Case) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """The algorithm under test and its psum reference, as per-device functions."""
    if case.algorithm == "parameter_server":
        return (
            lambda g, p: comm.parameter_server_step(g[0], p, sgd, "data")[None],
            lambda g, p: sgd(p, lax.psum(g[0], "data"))[None],
        )
    if case.algorithm == "hierarchical":
        return (
            lambda x: comm.hierarchical_all_reduce(x, "fsdp", "data"),
            lambda x: lax.psum(x, ("data", "fsdp")),
        )
    algorithms = {
        "sliced": lambda x: comm.sliced_all_reduce(x, "data", case.inner or 1),
        "ring": lambda x: comm.ring_all_reduce(x, "data", buckets=case.buckets),
        "halving_doubling": lambda x: comm.halving_doubling_all_reduce(x, "data"),
    }
    return algorithms[case.algorithm], lambda x: lax.psum(x, "data")


@dataclasses.dataclass(frozen=True)
class Compiled:
    out: np.ndarray  # every device's result, stacked along the mesh axes
    reference: np.ndarray  # the same from lax.psum
    hlo: str


@functools.cache
def compiled(case: Case, dtype: str) -> Compiled:
    """Compile ``case`` once and run it and its psum reference on the same inputs."""
    sizes = case.sizes
    mesh = mj.make_mesh(sizes, devices=jax.devices()[: case.n])
    axes = tuple(sizes)
    rng = np.random.default_rng(case.n)

    def draw(shape: tuple[int, ...]) -> jax.Array:
        # Positive floats keep psum's relative error at rounding level; ints are exact anyway.
        values = rng.integers(-50, 50, shape) if dtype == "int32" else rng.uniform(1.0, 2.0, shape)
        return jnp.asarray(values, dtype)

    if case.algorithm == "parameter_server":
        args = (draw((case.n, *BLOCK)), draw(BLOCK))
        in_specs, out_specs = (P("data"), P()), P("data")
    else:
        args = (draw((*sizes.values(), 1, *BLOCK)),)
        in_specs, out_specs = P(*axes), P(*axes)
    fn, reference = body(case)

    def run(f: Callable[..., jax.Array]) -> jax.stages.Compiled:
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)).lower(*args).compile()

    program = run(fn)
    text = program.as_text()
    assert text is not None
    return Compiled(out=np.asarray(program(*args)), reference=np.asarray(run(reference)(*args)), hlo=text)


def collective_counts(hlo: str) -> dict[str, int]:
    """Collective instructions by opcode; an async ``-start``/``-done`` pair counts once."""
    found = re.findall(r"\b(collective-permute|all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", hlo)
    return {kind: found.count(kind) for kind in ("collective-permute", *OTHER_COLLECTIVES)}


# ---- equal to psum -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_algorithm_equals_psum_on_every_device_and_keeps_dtype(devices, case, dtype):
    result = compiled(case, dtype)
    assert result.out.dtype == result.reference.dtype == np.dtype(dtype)
    assert result.out.shape == result.reference.shape
    if dtype == "int32":
        np.testing.assert_array_equal(result.out, result.reference)
    else:
        np.testing.assert_allclose(result.out, result.reference, rtol=1e-6, atol=0)


# ---- permutes only, in the predicted number ------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiled_program_holds_only_the_predicted_collective_permutes(devices, case):
    counts = collective_counts(compiled(case, "float32").hlo)
    assert {k: counts[k] for k in OTHER_COLLECTIVES} == dict.fromkeys(OTHER_COLLECTIVES, 0)
    assert counts["collective-permute"] == case.permutes()
    algorithm = "hierarchical" if case.algorithm == "sliced" else case.algorithm
    steps = comm.cost(algorithm, case.n, 1.0, buckets=case.buckets, inner=case.inner).steps
    assert steps == case.permutes()


def test_algorithms_leave_a_one_device_axis_and_empty_arrays_unchanged():
    x = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    mesh = mj.make_mesh(data=1, devices=jax.devices()[:1])
    empty = jnp.zeros((0, 3), jnp.float32)
    one = jax.shard_map(
        lambda a, e: (comm.ring_all_reduce(a, "data", buckets=2), comm.halving_doubling_all_reduce(e, "data")),
        mesh=mesh,
        in_specs=(P(), P()),
        out_specs=(P(), P()),
    )
    same, still_empty = one(x, empty)
    np.testing.assert_array_equal(same, x)
    assert still_empty.shape == (0, 3)


def test_ring_rejects_fewer_than_one_bucket():
    mesh = mj.make_mesh(data=2, devices=jax.devices()[:2])
    mapped = jax.shard_map(
        lambda a: comm.ring_all_reduce(a, "data", buckets=0), mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
    with pytest.raises(ValueError, match="buckets"):
        mapped(jnp.zeros((2, 3)))


# ---- cost table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "n", "kwargs", "steps", "sent"),
    [
        ("ring", 1, {}, 0, 0.0),
        ("ring", 4, {}, 6, 1500.0),  # 2*3 steps; 2*3/4 * 1000
        ("ring", 4, {"buckets": 3}, 18, 1500.0),  # buckets add steps, not bytes
        ("ring", 8, {}, 14, 1750.0),  # 2*7/8 * 1000
        ("halving_doubling", 8, {}, 6, 1750.0),  # 2*log2 8; 2*7/8 * 1000
        ("halving_doubling", 6, {}, 6, 2500.0),  # p=4: 2*2 + 2 fold; 2*3/4 * 1000 + 1000
        ("halving_doubling", 3, {}, 4, 2000.0),  # p=2: 2*1 + 2; 1000 + 1000
        # Hierarchical sends a flat ring's 2(n-1)/n * V in fewer steps: 2(a-1) + 2(b-1), not 2(ab-1).
        ("hierarchical", 8, {"inner": 4, "outer": 2}, 8, 1750.0),  # 2*3 + 2*1; 1500 + 2*1/2 * 250
        ("hierarchical", 8, {"inner": 2}, 8, 1750.0),  # outer 4: 2*1 + 2*3; 1000 + 2*3/4 * 500
        ("parameter_server", 4, {}, 6, 1500.0),  # 3 pushes + 3 pulls of 250
    ],
)
def test_cost_table_matches_hand_computed_steps_and_bytes(algorithm, n, kwargs, steps, sent):
    c = comm.cost(algorithm, n, 1000, **kwargs)
    assert (c.steps, c.bytes_per_device) == (steps, pytest.approx(sent))


def test_time_is_alpha_per_step_plus_beta_per_byte():
    c = comm.cost("ring", 4, 1000)
    assert comm.time_s(c, alpha=1e-6, beta=1e-9) == pytest.approx(6e-6 + 1.5e-6)


@pytest.mark.parametrize(
    ("algorithm", "n", "kwargs", "message"),
    [
        ("tree", 4, {}, "unknown algorithm"),
        ("hierarchical", 8, {"inner": 3}, "inner x outer"),
        ("hierarchical", 8, {}, "inner= or outer="),
        ("ring", 0, {}, "at least 1"),
    ],
)
def test_cost_rejects_unknown_algorithms_and_mismatched_axes(algorithm, n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        comm.cost(algorithm, n, 1000, **kwargs)
