"""``bench/collectives.py``: its prediction, fit and comparison helpers, and quick end-to-end runs."""

from __future__ import annotations

import json
import math

import pytest
from bench_scripts import load_bench

from mlsys_jax.comm.models import AlphaBeta

BENCH = load_bench("collectives")
CAL = {"latency": 1e-5, "bandwidth": 1e9, "collective_start_s": 1e-4, "dispatch_s": 1e-4}


def test_predict_ring_and_psum_match_alpha_beta():
    alpha, bandwidth, n, v = 1e-5, 1e9, 8, 1 << 20
    expected = 2 * (n - 1) * alpha + 2 * (n - 1) / n * v / bandwidth
    assert BENCH.predict("ring", n, v, alpha, bandwidth) == pytest.approx(expected)
    assert BENCH.predict("psum", n, v, alpha, bandwidth) == pytest.approx(expected)
    assert BENCH.predict("parameter_server", n, v, alpha, bandwidth) == pytest.approx(expected)
    # The single server runs on worker 0: n-1 pushes and n-1 pulls of the whole V.
    single = 2 * (n - 1) * alpha + 2 * (n - 1) * v / bandwidth
    assert BENCH.predict("parameter_server_single", n, v, alpha, bandwidth) == pytest.approx(single)


def test_predict_halving_doubling_and_hierarchical():
    alpha, bandwidth, n, v = 2e-5, 4e9, 8, 4096
    hd = 2 * 3 * alpha + 2 * 7 / 8 * v / bandwidth
    assert BENCH.predict("halving_doubling", n, v, alpha, bandwidth) == pytest.approx(hd)
    inner, outer = BENCH.INNER, n // BENCH.INNER
    steps = 2 * (inner - 1) + 2 * (outer - 1)
    sent = 2 * (inner - 1) / inner * v + 2 * (outer - 1) / outer * v / inner
    assert BENCH.predict("hierarchical", n, v, alpha, bandwidth) == pytest.approx(steps * alpha + sent / bandwidth)


def test_fitted_prediction_uses_each_link_and_psum_keeps_the_calibration():
    one, two = BENCH.SETTINGS["1x8"], BENCH.SETTINGS["2x4"]
    inner, outer = AlphaBeta(1e-4, 1e-9), AlphaBeta(5e-4, 2e-9)
    v = 4096
    assert BENCH.predict_fit("ring", one, v, {"inner": inner}, CAL) == pytest.approx(14 * 1e-4 + 1.75 * v * 1e-9)
    # Across two processes every ring step has a message between them: the slower link.
    assert BENCH.predict_fit("ring", two, v, {"inner": inner, "outer": outer}, CAL) == pytest.approx(
        14 * 5e-4 + 1.75 * v * 2e-9
    )
    # A figure of its own for steps with both kinds of message takes their place.
    mixed = AlphaBeta(3e-3, 1e-9)
    links = {"inner": inner, "outer": outer, "mixed": mixed}
    assert BENCH.predict_fit("ring", two, v, links, CAL) == pytest.approx(14 * 3e-3 + 1.75 * v * 1e-9)
    # Hierarchical: the inner ring inside each process, the outer ring of V/4 across.
    hier = 6 * 1e-4 + 1.5 * v * 1e-9 + 2 * 5e-4 + v / 4 * 2e-9
    assert BENCH.predict_fit("hierarchical", two, v, {"inner": inner, "outer": outer}, CAL) == pytest.approx(hier)
    for setting in (one, two):
        assert BENCH.predict_fit("psum", setting, v, {"inner": inner, "outer": outer}, CAL) == pytest.approx(
            BENCH.predict("psum", 8, v, CAL["latency"], CAL["bandwidth"])
        )


def test_collective_ops_per_all_reduce():
    assert [BENCH.collective_ops(a, 8) for a in BENCH.ALGOS] == [14, 6, 8, 14, 14, 1]


def test_microbenchmark_permutes_stay_inside_or_cross_processes():
    two = BENCH.SETTINGS["2x4"]
    inner, outer = BENCH.micro_pairs(two, "inner"), BENCH.micro_pairs(two, "outer")
    assert all(s // 4 == t // 4 and s != t for s, t in inner)
    assert all(s // 4 != t // 4 for s, t in outer)
    assert sorted(t for _, t in inner) == sorted(t for _, t in outer) == list(range(8))  # permutations
    mixed = BENCH.micro_pairs(two, "mixed")
    assert {s // 4 == t // 4 for s, t in mixed} == {True, False}  # both kinds in one step
    assert BENCH.micro_pairs(BENCH.SETTINGS["1x8"], "inner") == [(i, (i + 1) % 8) for i in range(8)]
    assert BENCH.SETTINGS["2x4"].links == ("inner", "outer", "mixed")


def test_errors_medians_and_ring_against_the_servers():
    assert BENCH.error(2.0, 1.0) == pytest.approx(-0.5)
    assert BENCH.error(1.0, 1.5) == pytest.approx(0.5)
    assert BENCH.median_abs([-0.5, 0.1, 0.3]) == pytest.approx(0.3)
    assert math.isnan(BENCH.median_abs([]))
    points = [
        {"algorithm": "ring", "bytes": 4, "error": -0.4, "measured_s": 2.0},
        {"algorithm": "ring", "bytes": 8, "error": 0.2, "measured_s": 3.0},
        {"algorithm": "parameter_server", "bytes": 4, "error": 0.1, "measured_s": 1.0},
        {"algorithm": "parameter_server_single", "bytes": 4, "error": 0.1, "measured_s": 4.0},
    ]
    summary = BENCH.summarize(points)
    assert summary["ring"] == pytest.approx(0.3)
    assert summary["parameter_server"] == pytest.approx(0.1)
    assert summary["overall"] == pytest.approx(0.15)
    assert "psum" not in summary
    rows = BENCH.ring_vs_servers(points, 8)
    assert [r["bytes"] for r in rows] == [4, 8]
    assert rows[0]["ps_over_ring"] == pytest.approx(0.5) and rows[0]["single_over_ring"] == pytest.approx(2.0)
    assert "ps_over_ring" not in rows[1]
    assert rows[0]["ring_sent"] == pytest.approx(7.0)  # 2(n-1)/n V
    assert (rows[0]["ps_out"], rows[0]["ps_back"]) == (pytest.approx(3.5), pytest.approx(3.5))  # (n-1)/n V each
    assert (rows[0]["single_out"], rows[0]["single_back"]) == (4.0, 4.0)  # V each way per worker
    assert (rows[0]["server_in"], rows[0]["server_out"]) == (32.0, 32.0)  # n V each way at the server


def test_model_crossovers_of_the_ring_and_the_servers():
    links = {"inner": AlphaBeta(1e-4, 1e-9)}
    rows = {r["pattern"]: r for r in BENCH.model_crossovers(BENCH.SETTINGS["1x8"], links, [4096, 1 << 20])}
    assert rows["parameter_server"]["faster_above"] == "tie"
    dedicated = rows["parameter_server_single (dedicated server)"]
    assert dedicated["crossover_bytes"] is None and dedicated["faster_above"] == "ring"
    assert all(r > 1 for r in dedicated["model_over_ring"].values())


def test_parse_sizes_and_chain_length():
    assert BENCH.parse_sizes("quick") == [4096, 65536]
    assert BENCH.parse_sizes("1024, 4096") == [1024, 4096]
    with pytest.raises(ValueError):
        BENCH.parse_sizes("3")
    assert BENCH.chain_length(1e-3, 0.05, 64) == 50
    assert BENCH.chain_length(1.0, 0.05, 64) == 3
    assert BENCH.chain_length(1e-9, 0.05, 64) == 64


def test_loop_ops_counts_only_the_collectives_inside_the_loop(devices):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import mlsys_jax as mj
    from mlsys_jax import comm

    mesh = mj.make_mesh(data=8)

    def invariant_grads(x, k):  # the push phase does not depend on the carry: XLA hoists it
        return jax.lax.fori_loop(0, k, lambda _, y: comm.parameter_server_step(x, y, lambda p, g: p - g, "data"), x)

    fn = jax.jit(
        jax.shard_map(invariant_grads, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"), check_vma=False)
    )
    compiled = fn.lower(jnp.zeros((8 * 16,)), jnp.int32(2)).compile()
    assert BENCH.loop_ops(compiled) < 14  # what the bench's check catches


def test_quick_run_writes_every_algorithm(devices, tmp_path):
    out = tmp_path / "collectives.json"
    BENCH.run(["--quick", "--setting", "1x8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {p["algorithm"] for p in result["points"]} == set(BENCH.ALGOS)
    assert len(result["points"]) == len(BENCH.ALGOS) * 2
    for p in result["points"]:
        for key in ("measured_s", "predicted_s", "predicted_fit_s"):
            assert math.isfinite(p[key]) and p[key] > 0, (p["algorithm"], key, p[key])
        assert p["ops_in_loop"] == p["model_ops"], p  # every step of the algorithm runs in the loop
    run = result["runs"]["1x8"]
    link = run["links"]["inner"]
    assert link["alpha_s"] > 0 and len(link["points"]) == 2
    assert set(run["median_abs_error_fit"]) == {*BENCH.ALGOS, "overall"}
    assert {r["bytes"] for r in run["ring_vs_parameter_server"]} == {4096, 65536}
    assert result["calibration"]["latency"] > 0 and result["calibration"]["bandwidth"] > 0
    assert result["jax"] and result["why"]
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_quick_run_of_two_processes_over_gloo(tmp_path):
    out = tmp_path / "collectives.json"
    BENCH.run(["--quick", "--setting", "2x4", "--sizes", "4096", "--out", str(out)])
    result = json.loads(out.read_text())
    run = result["runs"]["2x4"]
    assert set(run["links"]) == {"inner", "outer", "mixed"}
    assert {p["algorithm"] for p in run["points"]} == set(BENCH.ALGOS)
    assert all(p["ops_in_loop"] == p["model_ops"] for p in run["points"])
    assert all(p["measured_s"] > 0 for p in run["points"])
