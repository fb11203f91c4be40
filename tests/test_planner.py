"""The auto-planner: its analytic collectives against the compiled step's, its enumeration, what
it refuses and drops, its ranking on a toy machine, and a winner the recipe accepts."""

from __future__ import annotations

import dataclasses
import itertools
import shlex

import pytest
import tyro

from mlsys_jax.analysis import analytic, planner
from mlsys_jax.analysis.compiled_step import analyze
from mlsys_jax.analysis.memory import memory_of
from mlsys_jax.analysis.parts import plan_parts
from mlsys_jax.cli import FLAT
from mlsys_jax.meshes import Link, load_preset
from mlsys_jax.train.config import RunConfig

#: Plans on the 8 test devices whose compiled collectives the analytic model must match.
COMPILED_PLANS = {
    "dp": {"model": "small", "mesh": "data=8", "strategy": "dp"},
    "fsdp": {"model": "small", "mesh": "fsdp=8", "strategy": "fsdp"},
    "tp": {"model": "tiny", "mesh": "data=2,tensor=4", "strategy": "dp_tp"},
    "fsdp_tp": {"model": "small", "mesh": "fsdp=4,tensor=2", "strategy": "fsdp_tp", "microbatches": 2},
    "sequence": {"model": "small", "mesh": "fsdp=4,sequence=2", "strategy": "fsdp", "sequence_parallel": True},
    "pipeline": {
        "model": "tiny8",
        "mesh": "pipeline=2,fsdp=2,tensor=2",
        "strategy": "pp_fsdp_tp",
        "microbatches": 4,
        "remat": "full",
    },
}
#: The analytic bytes per step of each (kind, mesh axes) against the compiled step's: within this
#: share for every group that carries at least ``SIGNIFICANT`` of the step's bytes. What falls
#: below (the loss's scalars, the token count, the schedule's trace) is not modelled.
TOLERANCE = 0.10
SIGNIFICANT = 0.01


@pytest.mark.parametrize("name", list(COMPILED_PLANS))
def test_analytic_collectives_match_the_compiled_step(devices, name):
    settings = {"batch": 16, "seq": 128, **COMPILED_PLANS[name]}
    compiled = analytic.bytes_by_kind(r for r in analyze(**settings).collectives if r.traffic_bytes > 0)
    predicted = analytic.bytes_by_kind(analytic.collectives_of(RunConfig.of(**settings), reading="compiled"))
    total = sum(compiled.values())
    for key in set(compiled) | set(predicted):
        got, want = predicted.get(key, 0), compiled.get(key, 0)
        if max(got, want) < SIGNIFICANT * total:
            continue
        assert abs(got - want) <= TOLERANCE * want, (name, key, got, want)
    assert abs(sum(predicted.values()) - total) <= TOLERANCE * total


def test_the_executed_reading_is_what_an_accelerator_runs():
    """Half the bytes of the compiled reading where XLA:CPU widens bf16, a reduce-scatter where
    it all-reduces, and each pipeline branch once per microbatch rather than every tick."""
    cfg = RunConfig.of(model="small", mesh="fsdp=8", strategy="fsdp", batch=16, seq=128)
    executed = analytic.bytes_by_kind(analytic.collectives_of(cfg))
    as_compiled = analytic.bytes_by_kind(analytic.collectives_of(cfg, reading="compiled"))
    assert set(executed) == {("all-gather", ("fsdp",)), ("reduce-scatter", ("fsdp",))}
    assert 0.45 < executed[("all-gather", ("fsdp",))] / as_compiled[("all-gather", ("fsdp",))] < 0.55
    piped = {**COMPILED_PLANS["pipeline"], "batch": 16, "seq": 128}
    ticks = plan_parts(RunConfig.of(**piped)).schedule.ticks  # pyright: ignore[reportOptionalMemberAccess]
    gathers = {
        reading: sum(
            r.count
            for r in analytic.collectives_of(RunConfig.of(**piped), reading=reading)
            if r.kind == "all-gather" and r.axes == ("fsdp",)
        )
        for reading in analytic.READINGS
    }
    assert gathers["compiled"] == pytest.approx(gathers["executed"] * ticks / 4, rel=0.01)


def test_factorizations_cover_every_split_once():
    splits = list(planner.factorizations(8))
    assert len(splits) == 35  # 8 = 2^3 over 5 axes: C(3 + 4, 4)
    assert len({tuple(s.items()) for s in splits}) == 35
    assert all(s["pipeline"] * s["data"] * s["fsdp"] * s["sequence"] * s["tensor"] == 8 for s in splits)
    assert planner.strategy_for({"pipeline": 2, "data": 2, "tensor": 2}) == "pp_dp_tp"
    assert planner.strategy_for({"sequence": 8}) == "dp"


def test_links_follow_slices():
    two = load_preset("tpu-v5e-2x256")
    dcn, ici = two.links["dcn"], two.links["ici"]
    laid = planner.hardware_for(two, {"data": 2, "fsdp": 256})
    assert laid.link_of("data") == dcn and laid.link_of("fsdp") == ici
    laid = planner.hardware_for(two, {"pipeline": 2, "fsdp": 128, "tensor": 2})
    assert laid.link_of("pipeline") == dcn and laid.link_of("fsdp") == ici and laid.link_of("tensor") == ici
    assert planner.hardware_for(two, {"fsdp": 512}).link_of("fsdp") == dcn  # FSDP across slices
    assert planner.hardware_for(two, {"fsdp": 64, "tensor": 4}).link_of("fsdp") == ici  # one slice
    node = planner.hardware_for(load_preset("gpu-h100x8"), {"data": 2, "fsdp": 2, "tensor": 2})
    assert {node.link_of(a).name for a in ("data", "fsdp", "tensor")} == {"nvlink"}


@pytest.fixture(scope="module")
def toy():
    """``small`` on 8 devices of a machine whose links are slow (a data-parallel plan, moving
    the least, is fastest) and whose HBM is too small for the whole state replicated on each."""
    base = load_preset("cpu-8")
    device = dataclasses.replace(base.device, hbm_bytes=16 * 2**20)
    machine = dataclasses.replace(base, name="toy", device=device, links={"host": Link("host", 1e8, 1e-5)})
    return planner.auto_plan(8, machine, "small", seq=128, confirm=1)


def test_enumeration_accounts_for_every_setting(toy):
    counts = toy.outcomes
    assert set(counts) == {planner.mesh_text(s) for s in planner.factorizations(8)}
    assert sum(sum(c.values()) for c in counts.values()) == toy.enumerated
    assert sum(c.get("fits", 0) for c in counts.values()) == len(toy.candidates)
    assert toy.batch == 8 and toy.default_batch  # one sequence per device


def test_infeasible_and_unfit_plans_are_dropped(toy):
    # small has 2 key/value heads: tensor 4 or 8 cannot split them.
    assert toy.outcomes["data=2,tensor=4"] == {"tensor does not divide the key/value heads": 6}
    assert all(c.sizes["tensor"] <= 2 for c in toy.candidates)
    assert all(c.memory.fits for c in toy.candidates)
    assert toy.unfit and not any(c.fits for c in toy.unfit)
    assert not [c for c in toy.candidates if c.sizes["data"] == 8], "the whole state on every device fits no 16 MiB"


def test_the_ranking_follows_the_model(toy):
    steps = [c.step_s for c in toy.candidates[1:]]  # the analytic ones (only #1 was compiled)
    assert all(b >= a * (1 - planner.TIE) for a, b in itertools.pairwise(steps))
    # Slow links make the plans that move least (data parallel) the fastest, but they do not fit:
    # memory forces a sharded winner, and the winner says so.
    assert toy.outcomes["data=8"] == {"the state alone does not fit": 2}  # 1 row: 1 microbatch
    fastest = min(toy.unfit, key=lambda c: c.step_s)
    assert fastest.sizes["data"] > 1 and fastest.step_s < toy.winner.step_s
    assert "memory rules out" in toy.winner.why and "faster plan" in toy.winner.why
    for c in toy.top()[1:]:
        factor, _ = planner.deciding(c, toy.winner)
        assert factor in c.why or "ties #1" in c.why


def test_the_winner_is_confirmed_by_compiling(toy):
    conf = toy.winner.confirmed
    assert conf is not None and conf.ok, conf
    assert 0.8 < conf.bytes_ratio < 1.25
    assert toy.winner.step_s == pytest.approx(conf.analytic_step_s, rel=0.2)


def test_the_memory_is_the_memory_model_s(toy):
    for c in (*toy.top(3), *toy.unfit[:2]):
        want = memory_of(RunConfig.of(**c.flags))
        assert (c.memory.params, c.memory.opt_state, c.memory.activations) == (
            want.params,
            want.opt_state,
            want.activations,
        )


def test_the_winner_s_flags_are_a_command_line_the_recipe_accepts(toy):
    line = toy.winner_flags()
    assert line.startswith("--model small --mesh ")
    for flag in ("--strategy", "--microbatches", "--schedule", "--remat", "--batch 8", "--seq 128"):
        assert flag in line
    parsed = tyro.cli(RunConfig, args=shlex.split(line), config=FLAT)
    assert parsed == RunConfig.of(**toy.winner.flags)
    parts = plan_parts(parsed)
    assert parts.plan.num_devices == 8
    table = planner.planner_table(toy)
    assert table.row_count == min(5, len(toy.candidates))


def test_a_preset_layout_is_named_by_the_preset():
    assert planner.mesh_flag({"fsdp": 8, "tensor": 4}, "fsdp_tp", "tpu-v5p-64") == "tpu-v5p-64"
    assert planner.mesh_flag({"fsdp": 32}, "fsdp", "tpu-v5p-64") == "tpu-v5p-64"
    assert planner.mesh_flag({"data": 4, "fsdp": 8}, "dp_fsdp", "tpu-v5p-64") == "tpu-v5p-64"
    assert planner.mesh_flag({"fsdp": 16, "tensor": 2}, "fsdp_tp", "tpu-v5p-64") == "fsdp=16,tensor=2"
