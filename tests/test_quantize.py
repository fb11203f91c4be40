"""Weight-only int8: each matmul weight stored as int8 with one scale per output channel, about
half the bytes of bf16, and an engine serving it continues prompts like the full-precision one
wherever the model's choice is clear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.models import base, get_config, llama
from mlsys_jax.models.quantized import Int8Weight, quantize_int8, quantize_params, weight_bytes
from mlsys_jax.serve.engine import Engine, EngineConfig
from mlsys_jax.serve.requests import SamplingParams
from mlsys_jax.tokenizer import ByteTokenizer

MARGIN = 0.15  # a top-2 logit margin above this must survive int8 rounding (measured logit error: 0.05)


def test_each_output_channel_has_its_own_scale_and_rounding_stays_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (64, 4, 16)) * jnp.arange(1, 65)[:, None, None]
    q = quantize_int8(w, (1, 2))  # output channels along dim 0
    assert q.values.dtype == jnp.int8 and q.scale.shape == (64, 1, 1)
    assert np.all(np.abs(np.asarray(q.dequantize(jnp.float32) - w)) <= np.asarray(q.scale) / 2 + 1e-6)
    assert int(jnp.max(jnp.abs(q.values))) == 127
    zero = quantize_int8(jnp.zeros((3, 5)), (1,))
    assert np.all(np.asarray(zero.dequantize(jnp.float32)) == 0)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_int8_weights_take_at_most_055_of_bf16s_bytes(name):
    model = llama.language_model(get_config(name))
    params = jax.jit(lambda: mj.init_params(model.specs, jax.random.key(0)))()
    quantized = quantize_params(params, model.quantizable)
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    assert isinstance(quantized["layers"]["wq"], Int8Weight) and not isinstance(quantized["final_norm"], Int8Weight)
    assert weight_bytes(quantized) <= 0.55 * weight_bytes(bf16)


def test_an_int8_engine_continues_prompts_like_the_full_precision_one(devices):
    cfg = get_config("tiny", dtype="float32")
    model = llama.language_model(cfg)
    plan = mj.Plan(mj.make_mesh(tensor=2, devices=devices[:2]), mj.rules("tp"))
    params = plan.init(model.specs, jax.random.key(0))
    quantized = jax.jit(lambda p: quantize_params(p, model.quantizable))(params)
    prompts = [np.random.default_rng(i).integers(0, 256, n).tolist() for i, n in enumerate([4, 20, 9, 33])]
    runs = []
    for weights in (params, quantized):
        engine = Engine(
            model, plan, weights, ByteTokenizer(), context_limit=96, config=EngineConfig(max_seqs=4, num_blocks=32)
        )
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        assert engine.allocator.used == 0
        runs.append(out)
    forward = jax.jit(lambda p, t: base.forward(model, p, t))
    agreed = 0
    for i, p in enumerate(prompts):
        full, int8 = runs[0][f"r{i}"], runs[1][f"r{i}"]
        logits = np.asarray(forward(params, np.asarray([p + full], np.int32)))[0, len(p) - 1 :]
        for j, (a, b) in enumerate(zip(full, int8)):
            if a != b:  # the first divergence must be where the full model's choice was close
                top2 = np.sort(logits[j])[-2:]
                assert top2[1] - top2[0] <= MARGIN, (i, j, top2)
                break
            agreed += 1
    assert agreed >= 48  # most positions agree outright
