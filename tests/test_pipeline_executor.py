"""The pipeline executor: one jitted SPMD program over the ``pipeline`` axis runs a schedule tick
by tick and gives the unpipelined loss and every gradient (fp32, rtol 1e-5), running exactly the
work its schedule names; 1F1B's stash holds p microbatch inputs where GPipe's holds m."""

import dataclasses
import math

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.analysis import array_shapes, collectives
from mlsys_jax.models import get_config, llama
from mlsys_jax.models.base import loss_sums
from mlsys_jax.parallel.pipeline import ScheduleError, gpipe, interleaved, one_f_one_b, zero_bubble
from mlsys_jax.parallel.pipeline.executor import Tables, gathered_specs, pipeline_loss, pipeline_loss_and_grads
from mlsys_jax.parallel.plan import Plan

#: The 8-layer test config: two layers per stage at p=4.
CFG = get_config("tiny8", dtype="float32")
MODEL = llama.language_model(CFG)
KINDS = {"F": 1, "B": 2, "W": 3}


#: The stacked weights whose per-layer shapes no activation of these tests shares (seq 16).
DISTINCT = ("w_up", "w_gate", "w_down", "wq", "wo")


@pytest.fixture(scope="module")
def problem():
    params = mj.init_params(MODEL.specs, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (16, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((16, 16), bool)}
    batch["mask"][3, 5:] = False  # uneven token counts: the loss must weight microbatches by tokens

    def mean_loss(params):
        total, count = loss_sums(MODEL, params, batch)
        return total / count

    loss, grads = jax.value_and_grad(mean_loss)(params)
    return params, batch, float(loss), grads


def most_layers_held(hlo: str, plan: Plan) -> int:
    """The most layers of one stacked weight that any buffer of a compiled program holds: the
    product of the leading dims of every array whose trailing dims are one layer of a weight,
    whole or as its shard under ``plan``."""
    layer_shapes = set()
    for placed in plan.placements(MODEL.specs):
        if placed.path.split("/")[-1] in DISTINCT:
            layer_shapes |= {placed.shape[1:], placed.shard_shape[1:]}
    most = 0
    for _, dims in array_shapes(hlo):
        for shape in layer_shapes:
            if len(dims) > len(shape) and dims[-len(shape) :] == shape:
                most = max(most, math.prod(dims[: -len(shape)]))
    return most


CASES = {
    "gpipe": (gpipe(4, 8), {"pipeline": 4}, "pp", CFG),
    "1f1b": (one_f_one_b(4, 8), {"pipeline": 4}, "pp", CFG),
    "zb": (zero_bubble(4, 8), {"pipeline": 4}, "pp", CFG),
    "interleaved": (interleaved(4, 8, 2), {"pipeline": 4}, "pp", CFG),
    "1f1b-data2": (one_f_one_b(4, 8), {"pipeline": 4, "data": 2}, "pp_dp", CFG),
    "1f1b-fsdp2": (one_f_one_b(4, 8), {"pipeline": 4, "fsdp": 2}, "pp_fsdp", CFG),
    "1f1b-tensor2": (one_f_one_b(4, 8), {"pipeline": 4, "tensor": 2}, "pp_tp", CFG),
    "1f1b-pallas": (one_f_one_b(4, 8), {"pipeline": 4}, "pp", dataclasses.replace(CFG, attention_impl="pallas")),
    "1f1b-residuals": (one_f_one_b(4, 8), {"pipeline": 4}, "pp", CFG, "residuals"),
    "zb-residuals": (zero_bubble(4, 8), {"pipeline": 4}, "pp", CFG, "residuals"),
    "1f1b-fsdp2-gathered": (one_f_one_b(4, 8), {"pipeline": 4, "fsdp": 2}, "pp_fsdp", CFG, "inputs", "gathered"),
}


def weight_gathers_in_ticks(hlo: str) -> int:
    """All-gathers of weights (no activation dim of 16 tokens) inside the tick loop, per step."""
    return sum(
        c.count
        for c in collectives(hlo)
        if c.kind == "all-gather" and c.trip_counts and not any(len(sh) > 1 and sh[1] == 16 for sh in c.shapes)
    )


@pytest.mark.parametrize("case", CASES)
def test_a_pipelined_step_gives_the_unpipelined_loss_and_gradients(devices, problem, case):
    """And runs what its schedule says, holding no more than its own layers of any weight."""
    schedule, sizes, strategy, cfg, *extra = CASES[case]
    keep, weights = (*extra, *("inputs", "sharded")[len(extra) :])
    params, batch, want_loss, want_grads = problem
    model = llama.language_model(cfg)
    plan = Plan(mj.make_mesh(sizes, devices=devices[: math.prod(sizes.values())]), mj.rules(strategy))
    placed = jax.device_put(params, plan.param_shardings(model.specs))
    specs = gathered_specs(plan.param_pspecs(model.specs), "layers") if weights == "gathered" else None
    step = jax.jit(lambda p, b: pipeline_loss_and_grads(model, schedule, p, b, plan.mesh, plan.layout, keep, specs))
    compiled = step.lower(placed, batch).compile()
    loss, count, grads, trace = compiled(placed, batch)
    assert float(loss / count) == pytest.approx(want_loss, rel=1e-5)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )
    # What ran, tick by tick on every stage, is what the schedule says.
    ran = np.asarray(trace)
    for tick, row in enumerate(schedule.grid):
        for stage, work in enumerate(row):
            kind, microbatch, chunk = ran[stage, tick]
            want = (KINDS[work.kind], work.microbatch, schedule.local_chunk(work.chunk)) if work else (0, None, None)
            assert (kind, *((microbatch, chunk) if kind else (None, None))) == want
    # No buffer on a device holds more than the stage's L/p layers of any weight.
    hlo = compiled.as_text() or ""
    assert most_layers_held(hlo, plan) == CFG.n_layers // 4
    # FSDP gathers a stage's weights inside the ticks, unless they are held gathered for the step.
    if "fsdp" in sizes:
        assert (weight_gathers_in_ticks(hlo) == 0) == (weights == "gathered")


def test_the_layer_count_check_sees_an_unpipelined_step_gather_every_layer(devices, problem):
    """The check above can fail: differentiating the plain model under the same plan makes the
    partitioner gather all of a weight's layers onto every device."""
    params, batch, _, _ = problem
    plan = Plan(mj.make_mesh({"pipeline": 4}, devices=devices[:4]), mj.rules("pp"))
    placed = jax.device_put(params, plan.param_shardings(MODEL.specs))
    grad = jax.jit(jax.grad(lambda p, b: loss_sums(MODEL, p, b, plan.layout)[0]))
    assert most_layers_held(grad.lower(placed, batch).compile().as_text() or "", plan) == CFG.n_layers


def test_1f1b_stashes_p_microbatch_inputs_where_gpipe_stashes_m():
    for m in (8, 16):
        assert Tables.of(one_f_one_b(4, m)).slots == 4
        assert Tables.of(gpipe(4, m)).slots == m


def test_counts_that_cannot_run_are_refused_before_tracing(devices, problem):
    params, batch, _, _ = problem
    mesh = mj.make_mesh({"pipeline": 4, "data": 2}, devices=devices)
    with pytest.raises(ScheduleError, match=r"16 rows cannot be split into 16 microbatches over 2 .* 16 x 2 = 32"):
        pipeline_loss_and_grads(MODEL, one_f_one_b(4, 16), params, batch, mesh)
    with pytest.raises(ScheduleError, match="the schedule has 2 stages but the mesh's pipeline axis is 4"):
        pipeline_loss_and_grads(MODEL, one_f_one_b(2, 4), params, batch, mesh)
    deep = llama.language_model(get_config("tiny", dtype="float32", n_layers=6))
    with pytest.raises(ScheduleError, match=r"6 layers do not split into 4 stages"):
        pipeline_loss_and_grads(deep, one_f_one_b(4, 8), params, batch, mesh)


def temp_bytes(devices, make, microbatches: int, keep: str) -> int:
    """Temporary bytes per device of a compiled pipelined step, 8 rows x 32 tokens a microbatch."""
    mesh = mj.make_mesh({"pipeline": 4}, devices=devices[:4])
    params = jax.eval_shape(lambda: mj.init_params(MODEL.specs, jax.random.PRNGKey(0)))
    rows = 8 * microbatches
    batch = {
        k: jax.ShapeDtypeStruct((rows, 32), np.bool_ if k == "mask" else np.int32)
        for k in ("inputs", "targets", "mask")
    }
    schedule = make(4, microbatches)
    step = jax.jit(lambda p, b: pipeline_loss_and_grads(MODEL, schedule, p, b, mesh, keep=keep))
    analysis = step.lower(params, batch).compile().memory_analysis()
    assert analysis is not None
    return analysis.temp_size_in_bytes


def test_1f1b_memory_stays_flat_in_microbatches_while_gpipes_grows(devices):
    """Stashing residuals (no recompute), GPipe holds every microbatch's activations and 1F1B at
    most p of them; stashing inputs, both hold little, 1F1B least."""
    sizes = {
        (make.__name__, m): temp_bytes(devices, make, m, "residuals") for make in (gpipe, one_f_one_b) for m in (8, 16)
    }
    assert sizes[("one_f_one_b", 16)] <= 1.1 * sizes[("one_f_one_b", 8)]
    assert sizes[("gpipe", 16)] >= 1.6 * sizes[("gpipe", 8)]
    assert sizes[("one_f_one_b", 8)] <= 0.6 * sizes[("gpipe", 8)]
    recompute = [temp_bytes(devices, one_f_one_b, m, "inputs") for m in (8, 16)]
    assert recompute[1] <= 1.1 * recompute[0] and recompute[0] < 0.5 * sizes[("one_f_one_b", 8)]


@pytest.mark.parametrize("make", [lambda: one_f_one_b(4, 8), lambda: interleaved(4, 8, 2)], ids=["1f1b", "interleaved"])
def test_evaluation_runs_the_forwards_alone_on_each_stages_own_layers(devices, problem, make):
    params, batch, want_loss, _ = problem
    plan = Plan(mj.make_mesh({"pipeline": 4, "data": 2}, devices=devices), mj.rules("pp_dp"))
    placed = jax.device_put(params, plan.param_shardings(MODEL.specs))
    evaluate = jax.jit(lambda p, b: pipeline_loss(MODEL, make(), p, b, plan.mesh, plan.layout))
    compiled = evaluate.lower(placed, batch).compile()
    loss, count = compiled(placed, batch)
    assert float(loss / count) == pytest.approx(want_loss, rel=1e-5)
    assert most_layers_held(compiled.as_text() or "", plan) == CFG.n_layers // 4
