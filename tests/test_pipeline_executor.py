"""The pipeline executor: one jitted SPMD program over the ``pipeline`` axis runs a schedule tick
by tick and gives the unpipelined loss and every gradient (fp32, rtol 1e-5), running exactly the
work its schedule names; 1F1B's stash holds p microbatch inputs where GPipe's holds m."""

import math

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.models import get_config, llama
from mlsys_jax.models.base import loss_sums
from mlsys_jax.parallel.pipeline import ScheduleError, gpipe, interleaved, one_f_one_b, zero_bubble
from mlsys_jax.parallel.pipeline.executor import Tables, pipeline_loss_and_grads

#: The 8-layer test config: two layers per stage at p=4.
CFG = get_config("tiny", dtype="float32", n_layers=8)
MODEL = llama.language_model(CFG)
KINDS = {"F": 1, "B": 2, "W": 3}


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


@pytest.mark.parametrize(
    "make, sizes",
    [
        (gpipe, {"pipeline": 4}),
        (one_f_one_b, {"pipeline": 4}),
        (zero_bubble, {"pipeline": 4}),
        (lambda p, m: interleaved(p, m, 2), {"pipeline": 4}),
        (one_f_one_b, {"pipeline": 4, "data": 2}),
    ],
    ids=["gpipe", "1f1b", "zb", "interleaved", "1f1b-data2"],
)
def test_a_pipelined_step_gives_the_unpipelined_loss_and_gradients(devices, problem, make, sizes):
    params, batch, want_loss, want_grads = problem
    schedule = make(4, 8)
    mesh = mj.make_mesh(sizes, devices=devices[: math.prod(sizes.values())])
    loss, count, grads, trace = jax.jit(lambda p, b: pipeline_loss_and_grads(MODEL, schedule, p, b, mesh))(
        params, batch
    )
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


def test_1f1b_stashes_p_microbatch_inputs_where_gpipe_stashes_m():
    for m in (8, 16):
        assert Tables.of(one_f_one_b(4, m)).slots == 4
        assert Tables.of(gpipe(4, m)).slots == m


def test_interleaving_is_refused_until_the_executor_has_its_layout():
    with pytest.raises(ScheduleError, match="'interleaved' with 2 virtual stages"):
        Tables.of(interleaved(2, 4, 2))


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
