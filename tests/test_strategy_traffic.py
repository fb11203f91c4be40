"""The train step of ``bench/strategies.py``'s model moves no more bytes per device under any
strategy than it did before the model was split into embed / block / head pieces."""

from __future__ import annotations

import importlib.util

import jax
import pytest

import mlsys_jax as mj
from mlsys_jax import comm, train
from mlsys_jax.models import build_model

# Ring traffic per device per step (bytes): as XLA:CPU compiled it, and under the accelerator
# reading of ``mlsys_jax.comm`` (bf16 counted in bf16, all-reduce + slice as reduce-scatter).
# Measured with ``python bench/strategies.py`` on jax 0.10.2 before the refactor.
FROZEN_JAX = "0.10.2"
FROZEN_TRAFFIC = {
    "dp": (36_716_302, 20_201_230),
    "fsdp": (69_762_742, 26_627_510),
    "tp": (66_117_758, 33_087_614),
    "fsdp_tp": (40_144_100, 16_540_388),
    "dp_fsdp_tp": (35_158_708, 16_019_636),
}


@pytest.fixture(scope="module")
def bench(repo_root):
    spec = importlib.util.spec_from_file_location("bench_strategies", repo_root / "bench" / "strategies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(jax.__version__ != FROZEN_JAX, reason=f"figures frozen on jax {FROZEN_JAX}")
@pytest.mark.parametrize("strategy", list(FROZEN_TRAFFIC))
def test_no_strategy_moves_more_than_before(devices, bench, strategy):
    assert bench.FROZEN_TRAFFIC == FROZEN_TRAFFIC  # the bench compares against the same figures
    model = build_model(bench.MODEL_NAME, **bench.MODEL)
    plan = mj.Plan(mj.make_mesh(**bench.STRATEGIES[strategy]), mj.rules(strategy))
    step = train.make_train_step(model, plan, train.adamw(train.OptimConfig(), model.specs))
    raw = list(comm.collectives(step.lower(bench.BATCH, bench.SEQ).compile().as_text()))
    reading = comm.readings(raw, as_reduce_scatter=True, program_dtypes=True)
    compiled, read = FROZEN_TRAFFIC[strategy]
    assert sum(c.total_traffic_bytes for c in raw) <= compiled
    assert sum(c.total_traffic_bytes for c in reading) <= read
