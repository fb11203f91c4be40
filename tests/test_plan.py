"""Plans: rules turn logical axes into shardings, and every placement that cannot work is
refused before compilation with the parameter's path, shape, axis, mesh size and a fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import mlsys_jax as mj
from mlsys_jax.meshes import AXIS_NAMES
from mlsys_jax.models import get_config, llama
from mlsys_jax.params import ParamSpec

TINY = get_config("tiny", dtype="float32")
SPECS = llama.param_specs(TINY)


def plan_for(strategy, devices=None, **sizes):
    return mj.Plan(mj.make_mesh(devices=devices, **sizes), mj.rules(strategy))


@pytest.mark.parametrize(
    "strategy, sizes, expected",
    [
        ("dp", {"data": 8}, {"layers/wq": P(), "embed": P(), "layers/w_down": P()}),
        (
            "fsdp",
            {"fsdp": 8},
            {"layers/wq": P(None, "fsdp"), "embed": P(None, "fsdp"), "layers/w_down": P(None, None, "fsdp")},
        ),
        (
            "fsdp_tp",
            {"fsdp": 4, "tensor": 2},
            {
                "layers/wq": P(None, "fsdp", "tensor"),
                "embed": P("tensor", "fsdp"),
                "layers/w_down": P(None, "tensor", "fsdp"),
                "layers/wo": P(None, "tensor", None, "fsdp"),
            },
        ),
        ("dp_fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}, {"head": P("fsdp", "tensor"), "final_norm": P("fsdp")}),
    ],
)
def test_rule_presets_place_parameters(devices, strategy, sizes, expected):
    pspecs = {p.path: p.spec for p in plan_for(strategy, **sizes).placements(SPECS)}
    for path, spec in expected.items():
        assert pspecs[path] == spec, path


def test_activations_use_their_own_table(devices):
    plan = plan_for("dp_fsdp_tp", data=2, fsdp=2, tensor=2)
    assert plan.activation_spec(("batch", "seq", "embed")) == P(("data", "fsdp"))
    assert plan.activation_spec(("batch", "seq", "heads", "head_dim")) == P(("data", "fsdp"), None, "tensor")
    assert plan.batch_shards == 4
    sp = mj.Plan(mj.make_mesh(fsdp=4, sequence=2), mj.rules("fsdp", sequence_parallel=True))
    assert sp.activation_spec(("batch", "seq", "embed")) == P("fsdp", "sequence")


def test_size_one_mesh_axes_drop_out_of_specs(devices):
    plan = mj.Plan(mj.make_mesh(fsdp=8), mj.rules("dp_fsdp_tp"))
    assert {p.path: p.spec for p in plan.placements(SPECS)}["layers/wq"] == P(None, "fsdp")


def test_init_places_every_parameter_where_its_rules_say(devices):
    plan = plan_for("fsdp_tp", fsdp=4, tensor=2)
    params = plan.init(SPECS, jax.random.key(0))
    expected = plan.param_pspecs(SPECS)
    for arr, spec in zip(jax.tree.leaves(params), jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, P))):
        assert arr.sharding.is_equivalent_to(plan.sharding(spec), arr.ndim)
        # Each device holds only its shard: nothing is replicated that the rules split.
        assert arr.addressable_shards[0].data.shape == arr.sharding.shard_shape(arr.shape)


def test_init_values_do_not_depend_on_the_mesh(devices):
    one = plan_for("dp", devices=devices[:1], data=1).init(SPECS, jax.random.key(3))
    eight = plan_for("dp_fsdp_tp", data=2, fsdp=2, tensor=2).init(SPECS, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bytes_per_device_follow_the_shards(devices):
    placements = {p.path: p for p in plan_for("fsdp", fsdp=8).placements(SPECS)}
    wq = placements["layers/wq"]
    assert wq.bytes_per_device * 8 == wq.nbytes


def test_planning_needs_no_devices():
    mesh = AbstractMesh((1, 1, 8, 1, 1, 8), AXIS_NAMES)
    plan = mj.Plan(mesh, mj.rules("fsdp_tp"))
    big = llama.param_specs(get_config("70b"))
    placements = plan.placements(big)
    assert sum(p.bytes_per_device for p in placements) * 64 == pytest.approx(
        sum(p.nbytes for p in placements), rel=1e-3
    )
    with pytest.raises(mj.PlanError, match="abstract"):
        plan.init(big, jax.random.key(0))


# ---- every plan error, with path and fix ------------------------------------------------------


def error_of(fn):
    with pytest.raises(mj.PlanError) as err:
        fn()
    return str(err.value)


def test_dimension_not_divisible(devices):
    msg = error_of(lambda: plan_for("tp", tensor=8).placements(SPECS))
    for part in (
        "layers/wk",
        "(2, 64, 4, 16)",
        "'kv_heads'",
        "size 4",
        "('tensor',)",
        "8",
        "Fix",
        "rules.override(params={'kv_heads': None})",
    ):
        assert part in msg, (part, msg)


def test_unknown_logical_axis(devices):
    specs = {"proj": ParamSpec((64, 32), ("embd", "mlp"))}
    msg = error_of(lambda: plan_for("fsdp", fsdp=8).placements(specs))
    for part in ("'proj'", "(64, 32)", "'embd'", "Did you mean 'embed'", "Fix"):
        assert part in msg, (part, msg)


def test_unknown_mesh_axis(devices):
    rules = mj.rules("fsdp").override(params={"embed": "fsdpp"})
    msg = error_of(lambda: mj.Plan(mj.make_mesh(fsdp=8), rules).placements(SPECS))
    for part in ("'embed'", "'fsdpp'", "Did you mean 'fsdp'", "embed", "Fix", "(384, 64)"):
        assert part in msg, (part, msg)


def test_mesh_axis_used_twice_in_one_spec(devices):
    rules = mj.rules("fsdp_tp").override(params={"mlp": "fsdp"})
    msg = error_of(lambda: mj.Plan(mj.make_mesh(fsdp=4, tensor=2), rules).placements(SPECS))
    for part in ("layers/w_down", "(2, 256, 64)", "'fsdp'", "size 4", "both dim", "Fix"):
        assert part in msg, (part, msg)


def test_conflicting_rules(devices):
    rules = mj.Rules(params=[*mj.rules("fsdp").params, ("embed", "tensor")], activations=mj.rules("fsdp").activations)
    msg = error_of(lambda: mj.Plan(mj.make_mesh(fsdp=4, tensor=2), rules).placements(SPECS))
    for part in ("conflicting", "'embed'", "'fsdp'", "'tensor'", "embed", "(384, 64)", "Fix"):
        assert part in msg, (part, msg)


def test_activation_batch_not_divisible_is_refused_while_tracing(devices):
    plan = plan_for("dp", data=8)
    msg = error_of(lambda: jax.jit(lambda x: plan.constrain(x, ("batch", "embed"), "tokens")).lower(jnp.zeros((6, 4))))
    assert "'tokens'" in msg and "(6, 4)" in msg and "'batch'" in msg and "Fix" in msg


def test_spec_rank_mismatch(devices):
    plan = plan_for("dp", data=8)
    msg = error_of(lambda: plan.resolve(("batch",), (8, 4), kind="activation", path="x"))
    assert "'x'" in msg and "one logical axis per dim" in msg


def test_unknown_strategy_lists_presets():
    msg = error_of(lambda: mj.rules("zero3"))
    assert "'zero3'" in msg and "fsdp_tp" in msg


def test_override_replaces_without_conflict(devices):
    rules = mj.rules("tp").override(params={"kv_heads": None})
    placements = {p.path: p.spec for p in mj.Plan(mj.make_mesh(tensor=8), rules).placements(SPECS)}
    assert placements["layers/wk"] == P()
    assert placements["layers/wq"] == P(None, None, "tensor")
