"""``mlsys_jax.analysis.analyze``: the recipe's train step compiled ahead of time for any plan, on
this process's devices, in a subprocess simulating a larger mesh, or from shapes alone beyond
what can be simulated; its compiled state agrees with the plan's prediction from shapes."""

import jax
import jax.numpy as jnp
import pytest

from mlsys_jax.analysis.compiled_step import MAX_SIMULATED, Analysis, analyze
from mlsys_jax.analysis.hlo_cost import memory_traffic
from mlsys_jax.models.base import ConfigError
from mlsys_jax.parallel import PlanError


@pytest.fixture(scope="module")
def sharded():
    return analyze(model="small", mesh="data=2,fsdp=2,tensor=2", batch=16, seq=128)


def test_the_compiled_state_is_what_the_plan_predicts_from_shapes(sharded):
    assert sharded.strategy == "dp_fsdp_tp" and sharded.devices == 8
    batch_bytes = 4 * 128 * (4 + 4 + 1)  # 4 rows per device of int32 inputs and targets, a bool mask
    predicted = sharded.param_bytes + sharded.opt_state_bytes  # the arguments; gradients are temporaries
    assert sharded.compiled is not None
    assert sharded.compiled.argument_bytes == pytest.approx(predicted + batch_bytes, rel=0.05)
    assert sharded.compiled.flops > 0 and sharded.compiled.temp_bytes > 0


def test_every_collective_is_named_by_kind_mesh_axes_and_count(sharded):
    kinds = {r.kind for r in sharded.collectives}
    assert {"all-gather", "all-reduce"} <= kinds
    assert all(set(r.axes) <= {"data", "fsdp", "tensor"} and r.count >= 1 for r in sharded.collectives)
    assert any(r.axes == ("fsdp",) and r.kind == "all-gather" for r in sharded.collectives)


def test_an_analysis_survives_json(sharded):
    assert Analysis.from_json(sharded.to_json()) == sharded


def test_a_pipelined_plan_shows_its_permutes_inside_the_tick_loop():
    a = analyze(model="tiny8", mesh="pipeline=4,data=2", microbatches=8, batch=16, seq=32)
    assert a.schedule == "1f1b" and a.strategy == "pp_dp"
    permutes = [r for r in a.collectives if r.kind == "collective-permute"]
    assert permutes and all(r.axes == ("pipeline",) and r.trip_counts == (22,) for r in permutes)


def test_a_mesh_larger_than_this_process_compiles_in_a_subprocess():
    a = analyze(model="tiny", mesh="fsdp=16", batch=16, seq=32)
    assert a.devices == 16 and a.compiled is not None and a.compiled.argument_bytes > 0
    assert any(r.kind == "all-gather" for r in a.collectives)


def test_beyond_what_can_be_simulated_the_analysis_is_from_shapes_alone():
    a = analyze(model="70b", mesh=f"fsdp={2 * MAX_SIMULATED}", batch=2 * MAX_SIMULATED, seq=128)
    assert a.compiled is None and any(r.kind == "all-gather" and r.axes == ("fsdp",) for r in a.collectives)
    assert f"more than the {MAX_SIMULATED} CPU devices" in a.notes[-1]
    assert any("collectives from shapes" in note for note in a.notes)  # the analytic model's, said so
    assert a.param_bytes == pytest.approx(70.6e9 * 4 / (2 * MAX_SIMULATED), rel=0.01)


def test_bad_plans_are_refused_before_anything_compiles():
    with pytest.raises(ConfigError, match="unknown model family 'lama'"):
        analyze(model="lama:tiny", mesh="data=8")
    with pytest.raises(PlanError, match="cannot shard"):
        analyze(model="small", mesh="tensor=8,data=1", batch=16, seq=128).compiled  # noqa: B018
    with pytest.raises(PlanError, match="a pipeline of 8 stages needs at least 8 layers"):
        analyze(model="small", mesh="pipeline=8", batch=16, seq=128)


def test_a_batch_the_larger_mesh_cannot_split_is_refused_before_any_subprocess():
    with pytest.raises(PlanError, match="global batch 8 cannot be split"):
        analyze(model="tiny", mesh="fsdp=16", batch=8, seq=32)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_predicted_activations_and_gradients_are_within_15_percent_of_the_compiled_temporaries(remat):
    """fp32, a long sequence at a small width: where activations dominate the step's memory."""
    a = analyze(model="small", mesh="data=8", batch=8, seq=1024, dtype="float32", remat=remat)
    assert a.compiled is not None and a.activations is not None
    assert (a.activations + a.grad_bytes) / a.compiled.temp_bytes == pytest.approx(1.0, abs=0.15)
    assert a.activations > 10 * a.grad_bytes  # activation-dominated indeed


def test_memory_traffic_counts_every_trip_of_the_layer_loop():
    def compiled(model: str):
        a = analyze(model=model, mesh="data=8", batch=8, seq=64)
        assert a.compiled is not None
        return a.compiled

    two, eight = compiled("tiny"), compiled("tiny8")  # the same layer scanned 2 and 8 times
    # XLA's cost analysis counts the loop body once, whatever its trips (its figure grows with the
    # stacked weights the optimizer updates outside the loop); the traffic per step also grows
    # with the loop's trips
    xla, counted = eight.bytes_accessed / two.bytes_accessed, eight.bytes_per_step / two.bytes_per_step
    assert counted > 1.5 * xla and counted > 4


def test_memory_traffic_counted_once_is_xlas_own_count():
    def body(carry, w):
        return jnp.tanh(carry @ w), None

    def run(x, ws):
        return jax.lax.scan(body, x, ws)[0].sum()

    x, ws = jnp.ones((256, 256)), jnp.ones((6, 256, 256))
    exe = jax.jit(run).lower(x, ws).compile()
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost is not None
    traffic = memory_traffic(exe.as_text() or "")
    assert traffic.once == pytest.approx(cost["bytes accessed"], rel=0.25)
    assert traffic.per_step > 4 * traffic.once  # six trips of a body that is most of the program
