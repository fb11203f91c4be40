"""``bench/overlap_flags.py``: each variant's environment, the async-op count, and a CPU smoke run
of the script the GPU run calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parent.parent


BENCH = load_bench("overlap_flags")


def test_variant_env_sets_its_flags_and_replaces_the_same_names():
    base = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=x", "HOME": "h"}
    env = BENCH.variant_env(base, BENCH.VARIANTS["baseline"], smoke=False)
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=x", "--xla_gpu_enable_latency_hiding_scheduler=false"]
    assert env["HOME"] == "h" and "JAX_PLATFORMS" not in env
    smoke = BENCH.variant_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, BENCH.VARIANTS["lhs"], True)
    assert smoke["XLA_FLAGS"].split() == [
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_force_host_platform_device_count=2",
    ]
    assert smoke["JAX_PLATFORMS"] == "cpu"
    assert set(BENCH.VARIANTS["lhs+pipelined"]) > set(BENCH.VARIANTS["lhs"])


def test_async_ops_counts_start_ops_once():
    hlo = """
  %ag = (f32[4], f32[8]) all-gather-start(f32[4] %p), dimensions={0}
  %agd = f32[8] all-gather-done((f32[4], f32[8]) %ag)
  %ar = f32[8] all-reduce-start(f32[8] %x), to_apply=%add
  %ar.1 = f32[8] all-reduce(f32[8] %x), to_apply=%add
  %name_with_all-reduce-start = f32[8] add(f32[8] %x, f32[8] %x)
"""
    assert BENCH.async_ops(hlo) == 2


@pytest.mark.slow
def test_cpu_smoke_run_times_each_variant_in_its_own_process(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "overlap_flags.py"), "--cpu-smoke", "--out", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--variants", "baseline,lhs"], check=False, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "overlap_flags-cpu.json").read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == {"baseline", "lhs"}
    for name, r in rows.items():
        assert "error" not in r, r
        assert r["devices"] == 2 and r["step_s"] > 0 and r["collectives"] > 0
        assert BENCH.VARIANTS[name][0] in r["xla_flags"]
    assert not list(tmp_path.glob(".overlap-*"))  # the children's files are cleaned up
