"""Gradient sync inside the train step: each of our algorithms gives XLA's losses and parameters
under dp and dp_fsdp, its sum runs as collective-permutes issued per layer inside the backward
layer scan (no all-reduce of any gradient), choices that cannot work are refused by name before
anything is traced, and the recipe takes ``--grad-sync``."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from recipe_runs import FLAGS, env, run, unboxed
from token_batches import random_batches

import mlsys_jax as mj
from mlsys_jax import comm, train
from mlsys_jax.analysis.analytic import step_collectives
from mlsys_jax.analysis.compiled_step import CollectiveRow
from mlsys_jax.analysis.prediction import row_time
from mlsys_jax.comm.grad_sync import COST_ALGORITHM
from mlsys_jax.meshes import Link
from mlsys_jax.models import get_config, llama
from mlsys_jax.parallel import PlanError
from mlsys_jax.parallel.pipeline.schedule import make_schedule
from mlsys_jax.train.metrics import losses_by_step, read_jsonl

CFG = get_config("tiny", dtype="float32")
MODEL = llama.language_model(CFG)
OPT_CFG = train.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10)
OPT = train.adamw(OPT_CFG, MODEL.specs)
MESHES = {"dp": {"data": 8}, "dp_fsdp": {"data": 2, "fsdp": 4}, "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2}}
SYNCS = ("ring", "tree", "hierarchical", "ps")
LAYER_LEAVES = len(jax.tree_util.tree_leaves(MODEL.specs[MODEL.layers_key]))
OUTER_LEAVES = len(jax.tree_util.tree_leaves(MODEL.specs)) - LAYER_LEAVES


def batches(n: int = 3, batch: int = 8, seq: int = 16) -> list[dict[str, np.ndarray]]:
    return random_batches(CFG.vocab_size, n, batch, seq)


def plan_of(strategy: str) -> mj.Plan:
    return mj.Plan(mj.make_mesh(MESHES[strategy]), mj.rules(strategy))


@functools.cache
def trained(
    strategy: str, grad_sync: str, microbatches: int = 1, batch: int = 8
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Three steps' losses and the final parameters."""
    plan = plan_of(strategy)
    state = train.init_state(plan, MODEL.specs, OPT, seed=0)
    step = train.make_train_step(MODEL, plan, OPT, microbatches=microbatches, grad_sync=grad_sync)
    losses = []
    for b in batches(batch=batch):
        state, metrics = step(state, {k: jax.device_put(v, step.batch_shardings[k]) for k, v in b.items()})
        losses.append(float(np.asarray(metrics["loss"])))
    return np.array(losses), [np.asarray(p) for p in jax.tree_util.tree_leaves(state.params)]


@pytest.mark.parametrize("grad_sync", SYNCS)
@pytest.mark.parametrize("strategy", ["dp", "dp_fsdp"])
def test_each_grad_sync_gives_the_xla_losses_and_parameters(devices, strategy, grad_sync):
    ours, params = trained(strategy, grad_sync)
    xla, xla_params = trained(strategy, "xla")
    np.testing.assert_allclose(ours, xla, rtol=1e-5)
    assert ours[-1] < ours[0]
    for a, b in zip(params, xla_params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_sync_composes_with_fsdp_and_tensor_parallelism_at_once(devices):
    np.testing.assert_allclose(trained("dp_fsdp_tp", "tree")[0], trained("dp_fsdp_tp", "xla")[0], rtol=1e-5)


def test_microbatches_accumulate_before_one_sum(devices):
    ours, _ = trained("dp_fsdp", "ring", microbatches=2, batch=16)
    np.testing.assert_allclose(ours, trained("dp_fsdp", "xla", batch=16)[0], rtol=1e-5)


# ---- what the compiled step holds ----------------------------------------------------------


def compiled_text(grad_sync: str, strategy: str = "dp") -> str:
    step = train.make_train_step(MODEL, plan_of(strategy), OPT, grad_sync=grad_sync)
    text = step.lower(8, 16).compile().as_text()
    assert text is not None
    return text


def computations(hlo: str) -> dict[str, str]:
    """The HLO module's computations by name (the entry's name starts with ENTRY)."""
    parts = re.split(r"\n(?=(?:ENTRY )?%\S+ \(.*\{\n)", hlo)
    return {p.split(" (", 1)[0]: p for p in parts if p.lstrip().startswith(("%", "ENTRY"))}


def reduced_shapes(hlo: str) -> list[str]:
    """The result types of every all-reduce in the program."""
    return re.findall(r"= (\S+(?: \S+)*?) all-reduce(?:-start)?\(", hlo)


PERMUTES_PER_LEAF = {"ring": 2 * 7, "tree": 2 * 3, "hierarchical": 2 * 3 + 2 * 1, "ps": 2 * 7}


@pytest.mark.parametrize("grad_sync", SYNCS)
def test_gradients_are_summed_by_permutes_per_layer_inside_the_backward_scan(devices, grad_sync):
    hlo = compiled_text(grad_sync)
    per_leaf = PERMUTES_PER_LEAF[grad_sync]
    by_computation = {name: body.count("collective-permute(") for name, body in computations(hlo).items()}
    in_loops = [count for name, count in by_computation.items() if not name.startswith("ENTRY") and count]
    # One layer's weights are summed in the scan's body (run once per layer); the embedding, the
    # final norm and the head where the backward ends.
    assert in_loops == [per_leaf * LAYER_LEAVES]
    assert sum(by_computation.values()) == per_leaf * (LAYER_LEAVES + OUTER_LEAVES)
    assert "all-gather(" not in hlo and "reduce-scatter(" not in hlo
    # Only the loss and token count (scalars) are summed with an all-reduce.
    for shape in reduced_shapes(hlo):
        assert re.fullmatch(r"\(?(f32\[\](\{\})?(, )?)+\)?", shape), shape


@pytest.mark.parametrize("grad_sync", SYNCS)
def test_under_fsdp_each_device_sums_its_own_shards(devices, grad_sync):
    # data=2: every algorithm is 2 permutes per weight; the sum never reshapes an fsdp-sharded
    # gradient, so the partitioner adds no all-to-all or permute of its own around it.
    hlo = compiled_text(grad_sync, "dp_fsdp")
    assert hlo.count("collective-permute(") == 2 * (LAYER_LEAVES + OUTER_LEAVES)
    assert "all-to-all(" not in hlo


def test_xla_sync_sums_gradients_with_an_all_reduce(devices):
    hlo = compiled_text("xla")
    assert "collective-permute(" not in hlo
    assert any("[" in s and "[]" not in s.split(",")[0] for s in reduced_shapes(hlo))


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grad_sync", "sizes", "strategy", "kwargs", "message"),
    [
        ("allreduce", {"data": 8}, "dp", {}, "is not one of ['xla', 'ring', 'tree', 'hierarchical', 'ps']"),
        ("ring", {"fsdp": 8}, "fsdp", {}, "does not have: there is nothing for it to sum"),
        ("hierarchical", {"data": 8}, "dp", {"sync_slice": 3}, "slices of 3 devices cannot cut a data axis of 8"),
    ],
)
def test_a_grad_sync_that_cannot_work_is_refused_before_tracing(devices, grad_sync, sizes, strategy, kwargs, message):
    plan = mj.Plan(mj.make_mesh(sizes), mj.rules(strategy))
    with pytest.raises(PlanError) as e:
        train.make_train_step(MODEL, plan, OPT, grad_sync=grad_sync, **kwargs)
    assert message in str(e.value)
    assert "Fix:" in str(e.value)


def test_a_pipeline_keeps_xla_sync(devices):
    plan = mj.Plan(mj.make_mesh({"pipeline": 2, "data": 4}), mj.rules("pp_dp"))
    with pytest.raises(PlanError, match="Fix: --grad-sync xla with a pipeline"):
        train.make_train_step(MODEL, plan, OPT, grad_sync="ring", schedule=make_schedule("1f1b", 2, 2))


# ---- through the recipe --------------------------------------------------------------------


def recipe_flags(folder: Path, grad_sync: str, steps: int = 4, strategy: str = "dp_fsdp") -> list[str]:
    flags = [*FLAGS, "--ckpt-dir", str(folder), "--grad-sync", grad_sync, "--sample-tokens", "0", "--dtype", "float32"]
    flags[flags.index("--steps") + 1] = str(steps)
    flags[flags.index("--strategy") + 1] = strategy
    flags[flags.index("--mesh") + 1] = "data=2,fsdp=4" if strategy == "dp_fsdp" else "cpu-8"
    return flags


@pytest.mark.slow
def test_the_recipe_trains_with_each_sync_alike_and_may_switch_on_resume(tmp_path):
    xla = run(*recipe_flags(tmp_path / "xla", "xla"))
    assert xla.returncode == 0, xla.stderr[-2000:]
    ring = run(*recipe_flags(tmp_path / "ring", "ring"))
    assert ring.returncode == 0, ring.stderr[-2000:]
    assert "gradient sync: ring (reduce-scatter, then all-gather) over data=2, each layer's sum" in ring.stdout
    assert "gradient sync" not in xla.stdout
    expected = losses_by_step(read_jsonl(tmp_path / "xla" / "metrics.jsonl"))
    got = losses_by_step(read_jsonl(tmp_path / "ring" / "metrics.jsonl"))
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)
    switched = run(*recipe_flags(tmp_path / "xla", "tree", steps=6))
    assert switched.returncode == 0, switched.stderr[-2000:]
    assert "grad_sync: saved 'xla', now 'tree'" in unboxed(switched.stdout)
    assert sorted(losses_by_step(read_jsonl(tmp_path / "xla" / "metrics.jsonl"))) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_the_recipe_refuses_a_sync_its_plan_cannot_use_in_one_message(tmp_path):
    out = run(*recipe_flags(tmp_path / "run", "ring", strategy="fsdp_tp"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "there is nothing for it to sum" in unboxed(out.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    bogus = run(*recipe_flags(tmp_path / "other", "allreduce"))
    assert bogus.returncode == 2 and "Traceback" not in bogus.stderr
    assert "ring" in unboxed(bogus.stderr) and "hierarchical" in unboxed(bogus.stderr)


# ---- in the plan view's cost model ---------------------------------------------------------


def data_rows(grad_sync: str, microbatches: int = 1) -> list[CollectiveRow]:
    rows = step_collectives(plan_of("dp"), MODEL, 16 * microbatches, 64, microbatches, grad_sync=grad_sync)
    return [r for r in rows if r.axes == ("data",)]


@pytest.mark.parametrize("grad_sync", SYNCS)
def test_the_plan_view_prices_each_sync_by_its_own_steps_and_bytes(devices, grad_sync):
    link = Link("test", bandwidth=1e9, latency=1e-5)
    ours, xla = data_rows(grad_sync), data_rows("xla")
    algorithm = COST_ALGORITHM[grad_sync]
    assert ours and {r.label for r in ours} == {f"all-reduce ({algorithm})"}
    # The same gradients are summed, one layer at a time, once per step.
    assert sum(r.count * r.payload_bytes for r in ours) == sum(r.count * r.payload_bytes for r in xla)
    assert sum(r.count for r in ours) == LAYER_LEAVES * MODEL.num_layers + OUTER_LEAVES
    for r in ours:
        expected = comm.cost(algorithm, 8, r.payload_bytes, inner=r.slice_size)
        assert row_time(r, link) == pytest.approx(comm.time_s(expected, link.latency, 1 / link.bandwidth))
        assert r.traffic_bytes == pytest.approx(expected.bytes_per_device)
    if grad_sync == "hierarchical":
        assert {r.slice_size for r in ours} == {4}  # two halves of the 8 data devices
    total = lambda rows: sum(r.count * row_time(r, link) for r in rows)
    if grad_sync in ("ring", "ps"):  # XLA's all-reduce is priced as a ring: same steps, same bytes
        assert total(ours) == pytest.approx(total(xla))
    if grad_sync == "tree":  # 6 steps instead of 14 on 8 devices, and no more bytes
        assert total(ours) < total(xla)


def test_with_microbatches_each_leaf_is_summed_once_whole(devices):
    rows = data_rows("ring", microbatches=4)
    assert sum(r.count for r in rows) == LAYER_LEAVES + OUTER_LEAVES
    assert sum(r.count * r.payload_bytes for r in rows) == sum(r.count * r.payload_bytes for r in data_rows("ring"))


def test_mlsys_jax_plan_takes_grad_sync_and_names_the_algorithm():
    out = subprocess.run(
        [sys.executable, "-m", "mlsys_jax.cli", "plan", "--model", "tiny", "--mesh", "gpu-h100x8", "--strategy", "dp"]
        + ["--grad-sync", "tree", "--json", "-"],
        check=False,
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    kinds = {r["kind"] for r in report["collectives"] if r["axes"] == ["data"]}
    assert kinds == {"all-reduce (halving_doubling)"}


def test_mlsys_jax_plan_refuses_a_sync_under_a_pipeline_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "mlsys_jax.cli", "plan", "--model", "tiny", "--mesh", "pipeline=2,data=4"]
        + ["--grad-sync", "ring"],
        check=False,
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: grad_sync='ring'") and "Fix: --grad-sync xla" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("strategy", ["dp_fsdp", "dp_fsdp_tp"])
def test_bf16_gradients_summed_on_local_shards_compile_and_train(devices, strategy):
    # The nested shard_map is manual over fsdp (and tensor) only: XLA's CPU compiler has crashed
    # on bf16 gradients in partially manual programs before; this holds it to compiling and
    # giving XLA's first losses.
    model = llama.language_model(get_config("tiny", dtype="bfloat16"))
    optimizer = train.adamw(train.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10), model.specs)
    plan = plan_of(strategy)
    losses = {}
    for grad_sync in ("xla", "tree"):
        step = train.make_train_step(model, plan, optimizer, grad_sync=grad_sync)
        state = train.init_state(plan, model.specs, optimizer, seed=0)
        b = batches(1)[0]
        for _ in range(3):  # the first update is at the warmup's zero learning rate
            state, metrics = step(state, {k: jax.device_put(v, step.batch_shardings[k]) for k, v in b.items()})
        losses[grad_sync] = float(np.asarray(metrics["loss"]))
    assert np.isfinite(losses["tree"])
    np.testing.assert_allclose(losses["tree"], losses["xla"], rtol=1e-3)
