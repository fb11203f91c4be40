"""Validation: the mean next-token loss of the run's validation batches."""

from __future__ import annotations

from typing import Any

import jax

from mlsys_jax.train import data as data_lib
from mlsys_jax.train.setup import Run


def evaluate(run: Run, params: Any) -> float | None:
    """Token-weighted mean loss over the validation batches (None when there are none). All
    batches are dispatched before any result is read."""
    if not run.val:
        return None
    shardings, batch = run.step_fn.batch_shardings, run.cfg.data.batch
    sums = [run.eval_fn(params, data_lib.to_global(b, shardings, batch)) for b in run.val]
    total = count = 0.0
    for s, c in jax.device_get(sums):
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)
