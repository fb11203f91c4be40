"""``comm.scaling``: weak-scaling efficiency of data parallelism, its limits and the preset networks;
and ``bench/scaling.py``'s predictions for the shipped presets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from bench_scripts import load_bench

from mlsys_jax.comm import models, scaling
from mlsys_jax.comm.models import AlphaBeta
from mlsys_jax.meshes import load_preset

NVLINK = scaling.Network(AlphaBeta(5e-6, 1 / 450e9))
ALGOS = ("ring", "halving_doubling", "hierarchical", "parameter_server", "parameter_server_single")


@pytest.mark.parametrize("algorithm", ALGOS)
def test_one_worker_is_fully_efficient_and_more_workers_without_overlap_are_less(algorithm):
    work = scaling.Workload(compute_s=0.05, grad_bytes=250e6)
    points = scaling.scaling(work, NVLINK, algorithm, [1, 2, 4, 8, 16])
    assert points[0].comm_s == 0 and points[0].efficiency == points[0].efficiency_overlap == 1.0
    effs = [p.efficiency for p in points]
    assert all(a > b for a, b in itertools.pairwise(effs)), effs
    for p in points:
        assert p.step_s == pytest.approx(p.compute_s + p.comm_s)
        assert p.efficiency_overlap >= p.efficiency


def test_full_overlap_efficiency_is_min_of_one_and_compute_over_comm():
    for compute in (1e-4, 1e-3, 1e-2, 1e-1):
        work = scaling.Workload(compute_s=compute, grad_bytes=1e9)
        p = scaling.step(work, NVLINK, "ring", 8, overlap=1.0)
        assert p.efficiency_overlap == pytest.approx(min(1.0, compute / p.comm_s))
        assert p.step_overlap_s == pytest.approx(max(compute, p.comm_s))
        none = scaling.step(work, NVLINK, "ring", 8, overlap=0.0)
        assert none.step_overlap_s == pytest.approx(none.step_s)
        half = scaling.step(work, NVLINK, "ring", 8, overlap=0.5)
        assert half.step_overlap_s == pytest.approx(compute + max(0.0, p.comm_s - 0.5 * compute))


def test_comm_matches_the_alpha_beta_cost_and_grows_with_gradients():
    n, v = 8, 1e8
    expected = models.time_s(models.cost("ring", n, v), 5e-6, 1 / 450e9)
    assert scaling.comm_seconds("ring", n, v, NVLINK) == pytest.approx(expected)
    small = scaling.step(scaling.Workload(0.01, 1e6), NVLINK, "ring", 8).efficiency
    large = scaling.step(scaling.Workload(0.01, 1e9), NVLINK, "ring", 8).efficiency
    assert small > large


def test_workload_of_flops_and_a_shared_host():
    work = scaling.Workload.of_flops(1e12, 1e15, 1e6, mfu=0.5)
    assert work.compute_s == pytest.approx(2e-3)
    # Simulated devices sharing one host that runs one of them at full speed: compute grows as N.
    free = scaling.Network(AlphaBeta(0.0, 0.0))
    pts = scaling.scaling(work, free, "ring", [1, 2, 4], shared_host=1.0)
    assert [p.compute_s / work.compute_s for p in pts] == pytest.approx([1, 2, 4])
    assert [p.efficiency for p in pts] == pytest.approx([1, 0.5, 0.25])
    two = scaling.step(work, free, "ring", 4, shared_host=2.0)
    assert two.efficiency == pytest.approx(0.5)
    with pytest.raises(ValueError):
        scaling.Workload.of_flops(1e12, 1e15, 1e6, mfu=0.0)


def test_multi_slice_preset_puts_dcn_between_slices_and_hierarchical_wins_across_them():
    net = scaling.Network.of_preset(load_preset("tpu-v5e-2x256"))
    assert net.node_size == 256
    assert (net.inner.alpha, net.inner.beta) == (1e-6, pytest.approx(1 / 90e9))
    assert net.outer is not None and (net.outer.alpha, net.outer.beta) == (1e-5, pytest.approx(1 / 6.25e9))
    work = scaling.Workload(0.2, 2.5e9)
    within = {a: scaling.step(work, net, a, 256).comm_s for a in ("ring", "hierarchical")}
    assert within["ring"] == pytest.approx(within["hierarchical"])  # one slice: the same ring
    across = {a: scaling.step(work, net, a, 512).comm_s for a in ("ring", "hierarchical")}
    assert across["hierarchical"] < across["ring"] / 5  # only a 1/256 shard crosses the DCN
    one = scaling.Network.of_preset(load_preset("gpu-h100x8"))
    assert one.outer is None and one.node_size is None


def test_device_counts():
    assert scaling.device_counts(1) == [1]
    assert scaling.device_counts(8) == [1, 2, 4, 8]
    assert scaling.device_counts(32) == [1, 2, 4, 8, 16, 32]
    assert scaling.device_counts(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        scaling.device_counts(0)


# ---- bench/scaling.py ----------------------------------------------------------------------


def test_bench_predicts_every_preset_and_algorithm(tmp_path):
    bench = load_bench("scaling")
    out = tmp_path / "scaling.json"
    bench.run(["--no-measure", "--models", "llama:125m", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["predictions"]
    assert {r["preset"] for r in rows} == set(bench.PRESETS)
    assert {r["algorithm"] for r in rows} == set(bench.ALGOS)
    for r in rows:
        assert r["points"][0]["n"] == 1 and r["points"][0]["efficiency"] == 1.0
        assert r["points"][-1]["n"] == load_preset(r["preset"]).num_devices
    assert 100e6 < rows[0]["params"] < 200e6
    last = {(r["preset"], r["algorithm"]): r["points"][-1] for r in rows}
    assert last[("tpu-v5e-2x256", "hierarchical")]["efficiency"] > last[("tpu-v5e-2x256", "ring")]["efficiency"]
    assert result["host"]["rows"] == []
    assert out.with_suffix(".png").exists()
    assert str(Path(__file__).resolve().parent.parent) not in out.read_text()  # repository-relative only


def test_bench_host_prediction_from_the_one_device_step():
    bench = load_bench("scaling")
    measured = [{"devices": 1, "step_s": 0.05}, {"devices": 4, "step_s": 0.2}]
    rows = bench.host_prediction(measured, {"latency": 1e-5, "bandwidth": 3e9}, params=2e5)
    assert rows[0]["predicted_s"] == pytest.approx(0.05) and rows[0]["measured_efficiency"] == 1.0
    four = rows[1]
    assert four["predicted_comm_s"] < 1e-3  # 0.8 MB of gradients: tiny against the compute
    assert four["predicted_s"] == pytest.approx(4 * 0.05 + four["predicted_comm_s"])
    assert four["measured_efficiency"] == pytest.approx(0.25)
    assert four["dedicated_efficiency"] > 0.98
