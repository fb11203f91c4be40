"""The int8 KV cache: each block and K/V head on its own scale, which grows as a decoding block
fills and restarts when a block is taken afresh; attention over int8 pages reads the same keys
as over their widened values; and what serving in int8 costs in validation loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipe_runs import CORPUS

import mlsys_jax as mj
from mlsys_jax.kernels.paged_attention import Int8Pages, paged_attention, quantize_blocks
from mlsys_jax.kernels.paged_attention.pages import dequantize_blocks, write
from mlsys_jax.models import get_config, llama
from mlsys_jax.models.quantized import quantize_params
from mlsys_jax.serve.quality import validation_loss
from mlsys_jax.train import data

BLOCK = 16


def empty(num_blocks: int, heads: int = 2, dim: int = 8, scale: float = 0.0) -> Int8Pages:
    values = jnp.zeros((num_blocks, BLOCK, heads, dim), jnp.int8)
    return Int8Pages(values, jnp.full((num_blocks, heads), scale, jnp.float32))


def slots_of(blocks: list[int], n: int) -> np.ndarray:
    return np.array([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)], np.int32)


def growing(n: int = 40, seed: int = 0) -> np.ndarray:
    """Keys whose magnitude grows along the sequence, so every decode step can raise a scale."""
    x = np.random.default_rng(seed).standard_normal((1, n, 2, 8)).astype(np.float32)
    return x * np.linspace(0.1, 3.0, n, dtype=np.float32)[None, :, None, None]


def test_a_block_written_token_by_token_keeps_its_absmax_scale_and_half_a_step_per_requantization():
    x, blocks = growing(), [3, 5, 1]
    slots = slots_of(blocks, x.shape[1])
    pool, plain = empty(8, scale=5.0), jnp.zeros((8, BLOCK, 2, 8))  # a stale scale from an earlier owner
    raises = np.zeros((8, 2))
    for p in range(x.shape[1]):
        before = np.asarray(pool.scale)
        pool = write(pool, jnp.asarray(x[:, p : p + 1]), jnp.asarray(slots[None, p : p + 1]))
        plain = write(plain, jnp.asarray(x[:, p : p + 1]), jnp.asarray(slots[None, p : p + 1]))
        raises += (np.asarray(pool.scale) > before) & (p % BLOCK != 0)
    used = np.array(blocks)
    absmax = np.abs(np.asarray(plain)).max(axis=(1, 3)) / 127
    np.testing.assert_allclose(np.asarray(pool.scale)[used], absmax[used], rtol=1e-6)  # the stale 5.0 is gone
    err = np.abs(np.asarray(dequantize_blocks(pool.values, pool.scale, jnp.float32) - plain))
    # Each raise rounds the block's earlier values once more: at most half a step of the final scale each.
    bound = (raises[:, None, :, None] + 1) * np.asarray(pool.scale)[:, None, :, None] / 2 + 1e-6
    assert (err <= bound).all() and raises[used].sum() > 10
    assert np.all(np.asarray(pool.values)[[0, 2, 4, 6, 7]] == 0)  # blocks never written stay as they were


def test_a_chunk_written_at_once_is_quantized_on_its_blocks_absmax():
    x, blocks = growing(), [2, 0, 6]
    pool = write(empty(8, scale=3.0), jnp.asarray(x), jnp.asarray(slots_of(blocks, x.shape[1])[None]))
    direct = quantize_blocks(
        write(jnp.zeros((8, BLOCK, 2, 8)), jnp.asarray(x), jnp.asarray(slots_of(blocks, 40)[None]))
    )
    np.testing.assert_array_equal(np.asarray(pool.values)[blocks], np.asarray(direct.values)[blocks])
    np.testing.assert_allclose(np.asarray(pool.scale)[blocks], np.asarray(direct.scale)[blocks], rtol=1e-6)


def test_writing_into_one_block_leaves_every_other_block_bit_for_bit():
    rng = np.random.default_rng(1)
    pool = quantize_blocks(jnp.asarray(rng.standard_normal((6, BLOCK, 2, 8)), jnp.float32))
    loud = jnp.asarray(100 * rng.standard_normal((1, 3, 2, 8)), jnp.float32)  # raises block 4's scale
    after = write(pool, loud, jnp.asarray([[4 * BLOCK + 5, 4 * BLOCK + 6, 4 * BLOCK + 7]]))
    others = [0, 1, 2, 3, 5]
    np.testing.assert_array_equal(np.asarray(after.values)[others], np.asarray(pool.values)[others])
    np.testing.assert_array_equal(np.asarray(after.scale)[others], np.asarray(pool.scale)[others])
    assert (np.asarray(after.scale)[4] > np.asarray(pool.scale)[4]).all()


@pytest.mark.parametrize("q_len", [1, 8], ids=["decode", "chunk"])
def test_attention_over_int8_pages_is_attention_over_their_widened_values(q_len):
    rng = np.random.default_rng(2)
    k = jnp.asarray(rng.standard_normal((9, BLOCK, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((9, BLOCK, 2, 16)), jnp.float32)
    kq, vq = quantize_blocks(k), quantize_blocks(v)
    q = jnp.asarray(rng.standard_normal((3, q_len, 4, 16)), jnp.float32)
    table = jnp.asarray(rng.permutation(9)[:9].reshape(3, 3), jnp.int32)
    lengths = jnp.asarray([9, 30, 48], jnp.int32)
    got = paged_attention(q, kq, vq, table, lengths)
    kw, vw = (dequantize_blocks(p.values, p.scale, jnp.float32) for p in (kq, vq))
    np.testing.assert_allclose(got, paged_attention(q, kw, vw, table, lengths), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(got - paged_attention(q, k, v, table, lengths)))) < 0.03  # and near the fp32 one


def test_pages_that_are_not_int8_or_mismatched_are_refused_by_name():
    pool = quantize_blocks(jnp.zeros((4, BLOCK, 2, 16)))
    q, table, lengths = jnp.zeros((1, 1, 2, 16)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="both be Int8Pages"):
        paged_attention(q, pool, jnp.zeros((4, BLOCK, 2, 16)), table, lengths)
    with pytest.raises(ValueError, match=r"scale must be \(num_blocks, kv_heads\)"):
        paged_attention(q, pool, Int8Pages(pool.values, pool.scale[:, :1]), table, lengths)


# --- what int8 costs: validation loss ----------------------------------------------------------


@pytest.fixture(scope="module")
def served(devices):
    """tiny in bf16 (the baseline) and fp32, and validation batches of real text."""
    plan = mj.Plan(mj.make_mesh(tensor=2, devices=devices[:2]), mj.rules("tp"))
    corpus = data.load_corpus([CORPUS])
    batches = data.val_batches(corpus.val, seq_len=64, global_batch=4, num_batches=2)
    assert len(batches) == 2
    params = plan.init(llama.language_model(get_config("tiny")).specs, jax.random.key(3))
    return plan, batches, params


def test_through_the_paged_cache_the_loss_is_the_forwards(served):
    plan, batches, params = served
    model = llama.language_model(get_config("tiny", dtype="float32"))
    forward = validation_loss(model, plan, params, batches)
    for chunk in (1, 16):
        assert validation_loss(model, plan, params, batches, through="auto", chunk=chunk) == pytest.approx(
            forward, rel=1e-6
        )


def test_int8_weights_stay_within_1_percent_and_an_int8_cache_within_2_percent_of_bf16(served):
    plan, batches, params = served
    model = llama.language_model(get_config("tiny", dtype="bfloat16"))
    bf16 = validation_loss(model, plan, params, batches)
    quantized = jax.jit(lambda p: quantize_params(p, model.quantizable))(params)
    int8_weights = validation_loss(model, plan, quantized, batches)
    int8_cache = validation_loss(model, plan, params, batches, through="int8", chunk=1)
    assert abs(int8_weights / bf16 - 1) <= 0.01 and abs(int8_cache / bf16 - 1) <= 0.02
    assert int8_weights != bf16 and int8_cache != bf16  # really quantized
