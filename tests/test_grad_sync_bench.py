"""bench/grad_sync.py measures the step it names: our sync's permutes in the compiled step and
XLA's losses, on the devices the test session already has."""

from __future__ import annotations

import numpy as np
from bench_scripts import load_bench

from mlsys_jax.models import get_config, llama

BENCH = load_bench("grad_sync")


def test_a_measured_case_reports_its_permutes_time_and_xla_losses(devices):
    model = llama.language_model(get_config("tiny", dtype="float32"))
    ours = BENCH.measure(model, "dp", "tree", batch=8, seq=16, steps=1)
    xla = BENCH.measure(model, "dp", "xla", batch=8, seq=16, steps=1)
    leaves = 12  # 9 per layer, inside the scan, and embed, final norm, head
    assert ours["collectives"]["collective-permute"] == 2 * 3 * leaves
    assert "collective-permute" not in xla["collectives"]
    assert ours["step_ms"] > 0 and ours["compile_s"] > 0
    np.testing.assert_allclose(ours["losses"], xla["losses"], rtol=1e-5)
