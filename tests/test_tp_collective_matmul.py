"""Collective matmuls as the Llama model's tensor-parallel projections (``tp_matmul="collective"``):
the same logits and gradients as the einsums XLA partitions, the layers' all-reduces replaced by
collective-permute rings, and plain einsums wherever no tensor split fits.

The tiny model in fp32 (once in bf16): d_model 64, 8 heads, 4 K/V heads, mlp 256, two layers, on
8 x 16 tokens. Under tensor parallelism the einsums sum each layer's attention output and down
projection in one all-reduce apiece; the collective path keeps the residual stream split by
sequence over ``tensor`` and runs four rings per layer (q/k/v, the attention output, gate/up,
down) of n-1 collective-permutes each. Collectives are read from the compiled program with
``analysis.collectives``; those inside a ``while`` (the layer scan) are the layers'.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.analysis import Collective, analyze, collectives
from mlsys_jax.analysis.analytic import collectives_of
from mlsys_jax.models import base, get_config, llama
from mlsys_jax.models.base import UNPLACED, ConfigError
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.params import init_params
from mlsys_jax.train.config import RunConfig

XLA = get_config("tiny", dtype="float32")
COLLECTIVE = XLA.replace(tp_matmul="collective")
BATCH, SEQ = 8, 16
PLANS = {  # name -> (mesh sizes, rule preset)
    "tp2": ({"tensor": 2}, "tp"),
    "tp4": ({"tensor": 4}, "tp"),
    "fsdp_tp": ({"fsdp": 4, "tensor": 2}, "fsdp_tp"),
    "fsdp8": ({"fsdp": 8}, "fsdp_tp"),  # a tensor axis of 1
}


def make_plan(name: str) -> mj.Plan:
    sizes, strategy = PLANS[name]
    n = int(np.prod(list(sizes.values())))
    return mj.Plan(mj.make_mesh(sizes, devices=jax.devices()[:n]), mj.rules(strategy))


def batch(seq: int = SEQ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = rng.integers(0, XLA.vocab_size, (BATCH, seq + 1)).astype(np.int32)
    mask = np.ones((BATCH, seq), bool)
    mask[0, :3] = False  # some tokens do not count
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "mask": mask}


@functools.cache
def setup(cfg: LlamaConfig, plan_name: str | None) -> tuple[base.LanguageModel, base.Layout, Any]:
    """The model, its layout under the named plan (None: unplaced) and its parameters."""
    model = llama.language_model(cfg)
    plan = make_plan(plan_name) if plan_name else None
    params = (plan.init if plan else init_params)(model.specs, jax.random.key(0))
    return model, plan.layout if plan else UNPLACED, params


@functools.cache
def forward(cfg: LlamaConfig, plan_name: str | None, seq: int = SEQ) -> tuple[np.ndarray, tuple[Collective, ...]]:
    """The logits of the test batch and the collectives of the compiled forward pass."""
    model, layout, params = setup(cfg, plan_name)
    tokens = batch(seq)["inputs"]
    compiled = jax.jit(lambda p, t: base.forward(model, p, t, layout)).lower(params, tokens).compile()
    return np.asarray(compiled(params, tokens)), collectives(compiled)


@functools.cache
def gradients(cfg: LlamaConfig, plan_name: str | None) -> dict[str, np.ndarray]:
    """The gradient of the mean token loss (``loss_sums``) by parameter path."""
    model, layout, params = setup(cfg, plan_name)

    def loss(p: Any, b: dict[str, jax.Array]) -> jax.Array:
        total, count = base.loss_sums(model, p, b, layout)
        return total / count

    grads = jax.jit(jax.grad(loss))(params, batch())
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}


def kinds(ops: tuple[Collective, ...], in_layers: bool) -> Counter[str]:
    """How many ops of each kind the program holds inside the layer scan (or outside it)."""
    return Counter(c.kind for c in ops if bool(c.trip_counts) == in_layers)


@pytest.mark.parametrize("plan_name", ["tp2", "tp4", "fsdp_tp"])
def test_collective_logits_and_gradients_equal_the_einsum_path(devices, plan_name):
    got, _ = forward(COLLECTIVE, plan_name)
    want, _ = forward(XLA, plan_name)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_grads, want_grads = gradients(COLLECTIVE, plan_name), gradients(XLA, plan_name)
    assert got_grads.keys() == want_grads.keys()
    for path, g in got_grads.items():
        np.testing.assert_allclose(g, want_grads[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize(("plan_name", "n"), [("tp2", 2), ("tp4", 4)])
def test_the_layers_run_rings_where_the_einsums_all_reduce(devices, plan_name, n):
    _, einsum_ops = forward(XLA, plan_name)
    _, ring_ops = forward(COLLECTIVE, plan_name)
    assert kinds(einsum_ops, in_layers=True) == {"all-reduce": 2}  # attention output, down
    assert kinds(ring_ops, in_layers=True) == {"collective-permute": 4 * (n - 1)}
    # Outside the layers both sum the vocab-split embedding lookup; the rings' residual stream,
    # split by sequence, is gathered once over tensor for the vocab-split head.
    assert kinds(einsum_ops, in_layers=False) == {"all-reduce": 1}
    assert kinds(ring_ops, in_layers=False) == {"all-reduce": 1, "all-gather": 1}
    (gather,) = [c for c in ring_ops if c.kind == "all-gather"]
    assert gather.shapes == ((BATCH, SEQ, XLA.d_model),) and gather.group_size == n


def test_under_fsdp_the_layers_gather_only_the_weights_the_einsums_gather(devices):
    _, einsum_ops = forward(XLA, "fsdp_tp")
    _, ring_ops = forward(COLLECTIVE, "fsdp_tp")
    layer_kinds = kinds(ring_ops, in_layers=True)
    assert layer_kinds["collective-permute"] == 4 and layer_kinds.keys() == {"collective-permute", "all-gather"}

    def gathered(ops: tuple[Collective, ...]) -> tuple[set[int], int]:
        ags = [c for c in ops if c.kind == "all-gather" and c.trip_counts]
        return {c.group_size for c in ags}, sum(c.result_bytes for c in ags)

    ring_groups, ring_bytes = gathered(ring_ops)
    einsum_groups, einsum_bytes = gathered(einsum_ops)
    assert ring_groups == einsum_groups == {4}  # over fsdp only, never over tensor
    assert ring_bytes == einsum_bytes


def test_bfloat16_gradients_under_fsdp_tp_compile_and_agree(devices):
    """In the compute dtype the rings accumulate in fp32, so they agree to bf16's precision."""
    got = gradients(COLLECTIVE.replace(dtype="bfloat16"), "fsdp_tp")
    want = gradients(XLA.replace(dtype="bfloat16"), "fsdp_tp")
    for path, g in got.items():
        np.testing.assert_allclose(g, want[path], rtol=5e-2, atol=2e-3, err_msg=path)


def test_prefill_with_rings_then_decode_steps_give_the_full_forward_logits(devices):
    """Prefill writes the cache through the rings; a one-token step falls back to the einsums."""
    model, layout, params = setup(COLLECTIVE, "tp2")
    tokens = batch()["inputs"]
    prompt = SEQ - 2
    prefill = jax.jit(lambda p, t, c: base.prefill(model, p, t, c, layout))
    step = jax.jit(lambda p, t, pos, c: base.decode_step(model, p, t, pos, c, layout))
    logits, cache = prefill(params, tokens[:, :prompt], base.init_cache(model, BATCH, SEQ))
    got = [np.asarray(logits)]
    for pos in range(prompt, SEQ):
        logits, cache = step(params, tokens[:, pos], np.full((BATCH,), pos, np.int32), cache)
        got.append(np.asarray(logits)[:, None])
    want, _ = forward(XLA, "tp2")
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("plan_name", "seq"), [(None, SEQ), ("fsdp8", SEQ), ("tp4", 6)])
def test_collective_falls_back_to_the_einsums_where_no_tensor_split_fits(devices, plan_name, seq):
    """Unplaced, a tensor axis of 1, and a sequence of 6 that 4 tensor shards do not divide."""
    got, ring_ops = forward(COLLECTIVE, plan_name, seq)
    want, einsum_ops = forward(XLA, plan_name, seq)
    np.testing.assert_array_equal(got, want)
    assert [c.kind for c in ring_ops] == [c.kind for c in einsum_ops]
    assert not any(c.kind == "collective-permute" for c in ring_ops)


def test_an_unknown_tp_matmul_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"tp_matmul='ring' is not one of \('xla', 'collective'\)"):
        LlamaConfig(tp_matmul="ring")


def test_kernel_choices_say_which_tp_matmul_runs():
    assert "tp_matmul" not in llama.language_model(XLA).kernel_choices(BATCH, SEQ)
    said = llama.language_model(COLLECTIVE).kernel_choices(BATCH, SEQ)
    assert said["tp_matmul"].startswith("collective")


# ---- in the plan view ----------------------------------------------------------------------


def _by_kind(rows) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for r in rows:
        runs, moved = out.get(r.kind, (0, 0))
        out[r.kind] = (runs + r.count, moved + r.count * r.payload_bytes)
    return out


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_plan_view_counts_the_rings_the_compiled_step_runs(devices, remat):
    settings = {"model": "tiny", "mesh": "tensor=4", "strategy": "tp", "batch": 8, "seq": 32, "dtype": "float32"}
    settings["remat"] = remat
    compiled = _by_kind(analyze(**settings, tp_matmul="collective").collectives)
    shapes = _by_kind(collectives_of(RunConfig.of(**settings, tp_matmul="collective"), reading="compiled"))
    einsums = _by_kind(collectives_of(RunConfig.of(**settings), reading="compiled"))
    # 2 layers x (4 rings forward + 4 backward, + 3 recomputed under remat) x (n - 1) permutes.
    rings = 8 + (3 if remat == "full" else 0)
    assert shapes["collective-permute"] == compiled["collective-permute"]
    assert shapes["collective-permute"][0] == 2 * rings * 3
    assert shapes["all-gather"] == compiled["all-gather"]  # the head's tokens, forward and backward
    assert shapes["all-reduce"][1] == pytest.approx(compiled["all-reduce"][1], rel=0.02)  # embedding, loss
    assert "collective-permute" not in einsums
    assert einsums["all-reduce"][1] > shapes["all-reduce"][1]
