"""Collective matmuls as the Llama model's tensor-parallel projections (``tp_matmul="collective"``):
the same logits and gradients as the einsums XLA partitions, with the layers' all-reduces
replaced by collective-permute rings, and plain einsums wherever no tensor split fits.

The tiny model in fp32 (d_model 64, 8 heads, 4 K/V heads, mlp 256, two layers) on batches of
8 x 16 tokens. Under tensor parallelism the plain einsums sum each layer's attention output and
down projection in one all-reduce apiece; the collective path keeps the residual stream split by
sequence over ``tensor`` and runs four rings per layer (q/k/v, the attention output, gate/up,
down) of n-1 collective-permutes each. Collectives are counted inside the layer scan (the
``while`` body, by each op's metadata) and in the whole program; the CPU backend emits
synchronous ops, and a ``-start`` form counts once.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.models import base, get_config, llama
from mlsys_jax.models.base import UNPLACED, ConfigError
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.params import init_params

XLA = get_config("tiny", dtype="float32")
COLLECTIVE = XLA.replace(tp_matmul="collective")
BATCH, SEQ = 8, 16
KINDS = ("collective-permute", "all-reduce", "all-gather", "reduce-scatter", "all-to-all")
PLANS = {  # name -> (mesh sizes, rule preset)
    "tp2": ({"tensor": 2}, "tp"),
    "tp4": ({"tensor": 4}, "tp"),
    "fsdp_tp": ({"fsdp": 4, "tensor": 2}, "fsdp_tp"),
}


def make_plan(name: str) -> mj.Plan:
    sizes, strategy = PLANS[name]
    n = int(np.prod(list(sizes.values())))
    return mj.Plan(mj.make_mesh(sizes, devices=jax.devices()[:n]), mj.rules(strategy))


def batch(seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = rng.integers(0, XLA.vocab_size, (BATCH, seq + 1)).astype(np.int32)
    mask = np.ones((BATCH, seq), bool)
    mask[0, :3] = False
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "mask": mask}


def mean_loss(model: base.LanguageModel, layout: base.Layout) -> Any:
    def f(params: Any, b: dict[str, jax.Array]) -> jax.Array:
        total, count = base.loss_sums(model, params, b, layout)
        return total / count

    return f


def collective_counts(hlo: str, inside_layers: bool = False) -> dict[str, int]:
    """How many of each collective the compiled program holds (only those of the layer scan's
    body when ``inside_layers``)."""
    found = [
        m.group(1)
        for line in hlo.splitlines()
        if (m := re.search(r"\b(" + "|".join(KINDS) + r")(?:-start)?\(", line))
        and (not inside_layers or "/while/body/" in line)
    ]
    return {kind: found.count(kind) for kind in KINDS}


@functools.cache
def results(cfg: LlamaConfig, plan_name: str | None, seq: int = SEQ) -> dict[str, Any]:
    """Logits, gradients and the compiled forward's HLO of ``cfg`` under a plan (None: unplaced)."""
    model = llama.language_model(cfg)
    plan = make_plan(plan_name) if plan_name else None
    layout = plan.layout if plan else UNPLACED
    params = (plan.init if plan else init_params)(model.specs, jax.random.key(0))
    b = batch(seq)
    forward = jax.jit(lambda p, t: base.forward(model, p, t, layout)).lower(params, b["inputs"]).compile()
    grads = jax.jit(jax.grad(mean_loss(model, layout)))(params, b)
    return {
        "logits": np.asarray(forward(params, b["inputs"])),
        "grads": {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)},
        "hlo": forward.as_text(),
    }


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
    assert got["grads"].keys() == want["grads"].keys()
    for path, g in got["grads"].items():
        np.testing.assert_allclose(g, want["grads"][path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_collective_logits_and_gradients_equal_the_einsum_path(devices, plan_name):
    assert_same(results(COLLECTIVE, plan_name), results(XLA, plan_name))
