"""``bench/collectives.py``: its prediction and error helpers, and one quick end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest


def load_bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "collectives.py"
    spec = importlib.util.spec_from_file_location("bench_collectives", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_collectives"] = module
    spec.loader.exec_module(module)
    return module


BENCH = load_bench()


def test_predict_ring_and_psum_match_alpha_beta():
    alpha, bandwidth, n, v = 1e-5, 1e9, 8, 1 << 20
    expected = 2 * (n - 1) * alpha + 2 * (n - 1) / n * v / bandwidth
    assert BENCH.predict("ring", n, v, alpha, bandwidth) == pytest.approx(expected)
    assert BENCH.predict("psum", n, v, alpha, bandwidth) == pytest.approx(expected)
    assert BENCH.predict("parameter_server", n, v, alpha, bandwidth) == pytest.approx(expected)


def test_predict_halving_doubling_and_hierarchical():
    alpha, bandwidth, n, v = 2e-5, 4e9, 8, 4096
    hd = 2 * 3 * alpha + 2 * 7 / 8 * v / bandwidth
    assert BENCH.predict("halving_doubling", n, v, alpha, bandwidth) == pytest.approx(hd)
    inner, outer = BENCH.INNER, n // BENCH.INNER
    steps = 2 * (inner - 1) + 2 * (outer - 1)
    sent = 2 * (inner - 1) / inner * v + 2 * (outer - 1) / outer * v / inner
    assert BENCH.predict("hierarchical", n, v, alpha, bandwidth) == pytest.approx(steps * alpha + sent / bandwidth)


def test_per_op_variant_adds_start_per_collective():
    base = BENCH.predict("ring", 8, 1024, 1e-5, 1e9)
    assert BENCH.predict_per_op("ring", 8, 1024, 1e-5, 1e9, 1e-4) == pytest.approx(base + 14 * 1e-4)
    base = BENCH.predict("psum", 8, 1024, 1e-5, 1e9)
    assert BENCH.predict_per_op("psum", 8, 1024, 1e-5, 1e9, 1e-4) == pytest.approx(base + 1e-4)


def test_errors_and_medians():
    assert BENCH.error(2.0, 1.0) == pytest.approx(-0.5)
    assert BENCH.error(1.0, 1.5) == pytest.approx(0.5)
    assert BENCH.median_abs([-0.5, 0.1, 0.3]) == pytest.approx(0.3)
    assert math.isnan(BENCH.median_abs([]))
    points = [
        {"algorithm": "ring", "bytes": 4, "error": -0.4, "measured_s": 2.0, "bytes_per_device": 7.0},
        {"algorithm": "ring", "bytes": 8, "error": 0.2, "measured_s": 3.0, "bytes_per_device": 14.0},
        {"algorithm": "parameter_server", "bytes": 4, "error": 0.1, "measured_s": 1.0, "bytes_per_device": 7.0},
    ]
    summary = BENCH.summarize(points)
    assert summary["ring"] == pytest.approx(0.3)
    assert summary["parameter_server"] == pytest.approx(0.1)
    assert summary["overall"] == pytest.approx(0.2)
    assert "psum" not in summary
    versus = BENCH.ring_vs_ps(points)
    assert versus == [{"bytes": 4, "ps_over_ring": 0.5, "ring_bytes_per_worker": 7.0, "ps_bytes_per_worker": 7.0}]


def test_parse_sizes_and_chain_length():
    assert BENCH.parse_sizes("quick") == [4096, 65536]
    assert BENCH.parse_sizes("1024, 4096") == [1024, 4096]
    with pytest.raises(ValueError):
        BENCH.parse_sizes("3")
    assert BENCH.chain_length(1e-3, 0.05, 64) == 50
    assert BENCH.chain_length(1.0, 0.05, 64) == 3
    assert BENCH.chain_length(1e-9, 0.05, 64) == 64


def test_quick_run_writes_every_algorithm(devices, tmp_path):
    out = tmp_path / "collectives.json"
    BENCH.run(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {p["algorithm"] for p in result["points"]} == set(BENCH.ALGOS)
    assert len(result["points"]) == len(BENCH.ALGOS) * 2
    for p in result["points"]:
        for key in ("measured_s", "predicted_s", "predicted_per_op_s"):
            assert math.isfinite(p[key]) and p[key] > 0, (p["algorithm"], key, p[key])
    assert result["calibration"]["latency"] > 0 and result["calibration"]["bandwidth"] > 0
    assert result["jax"] and result["why"]
    assert out.with_suffix(".png").exists()
