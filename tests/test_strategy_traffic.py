"""The train step of ``bench/strategies.py``'s model moves no more bytes per device under any
strategy than it did before the model was split into embed / block / head pieces."""

from __future__ import annotations

import jax
import pytest
from bench_scripts import load_bench

import mlsys_jax as mj
from mlsys_jax import analysis, train
from mlsys_jax.models import build_model

FROZEN_JAX = "0.10.2"


# Its model, meshes and the traffic measured before the model was split (FROZEN_TRAFFIC: bytes per
# device per step, as compiled and under the reading).
BENCH = load_bench("strategies")


@pytest.mark.slow
@pytest.mark.skipif(jax.__version__ != FROZEN_JAX, reason=f"figures frozen on jax {FROZEN_JAX}")
@pytest.mark.parametrize("strategy", list(BENCH.FROZEN_TRAFFIC))
def test_no_strategy_moves_more_than_before(devices, strategy):
    bench = BENCH
    model = build_model(bench.MODEL_NAME, **bench.MODEL)
    plan = mj.Plan(mj.make_mesh(**bench.STRATEGIES[strategy]), mj.rules(strategy))
    step = train.make_train_step(model, plan, train.adamw(train.OptimConfig(), model.specs))
    raw = list(analysis.collectives(step.lower(bench.BATCH, bench.SEQ).compile().as_text()))
    reading = analysis.readings(raw, as_reduce_scatter=True, program_dtypes=True)
    compiled, read = bench.FROZEN_TRAFFIC[strategy]
    assert sum(c.total_traffic_bytes for c in raw) <= compiled
    assert sum(c.total_traffic_bytes for c in reading) <= read
