"""Paged attention: attending over keys kept in shuffled blocks of a shared pool is attending over
the same keys laid out contiguously, masked by each row's length and query offset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.kernels import KernelUnavailable, flash_attention
from mlsys_jax.kernels.paged_attention import paged_attention

LENGTHS = np.array([1, 5, 16, 37])  # with block size 16: partially filled last blocks and a full one
GARBAGE = 1e4  # what unwritten pool slots hold; finite, so hiding them is exact


def paginate(x: np.ndarray, lengths: np.ndarray, block_size: int, rng: np.random.Generator):
    """Scatter contiguous (batch, seq, kv_heads, head_dim) keys into a pool of shuffled blocks.

    Returns the pool and the block table. Slots past a row's length, the blocks no row uses, and
    the table entries past a row's used blocks (pointing at those unused blocks) are garbage.
    """
    batch, seq = x.shape[:2]
    max_blocks = seq // block_size
    spare = 3
    num_blocks = batch * max_blocks + spare
    physical = rng.permutation(num_blocks)
    pool = GARBAGE * rng.standard_normal((num_blocks, block_size, *x.shape[2:])).astype(np.float32)
    table = np.empty((batch, max_blocks), np.int32)
    unused = list(physical[batch * max_blocks :])
    for b in range(batch):
        used = -(-int(lengths[b]) // block_size)
        for j in range(max_blocks):
            block = physical[b * max_blocks + j]
            if j < used:
                filled = min(block_size, int(lengths[b]) - j * block_size)
                pool[block, :filled] = x[b, j * block_size : j * block_size + filled]
                table[b, j] = block
            else:
                unused.append(block)
                table[b, j] = rng.choice(unused)
    return jnp.asarray(pool), jnp.asarray(table)


def case(q_len: int, kv_heads: int, block_size: int, lengths=LENGTHS, heads: int = 4, head_dim: int = 16, seed=0):
    """Queries, contiguous keys/values (one spare block per row) and their paged layout."""
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    seq = (-(-int(max(lengths)) // block_size) + 1) * block_size
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
    k_pages, table = paginate(k, lengths, block_size, np.random.default_rng(seed + 1))
    v_pages, v_table = paginate(v, lengths, block_size, np.random.default_rng(seed + 1))
    assert (table == v_table).all()
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), k_pages, v_pages, table


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["group1", "group2", "group4"])
@pytest.mark.parametrize("q_len", [1, 8], ids=["decode", "chunk"])
def test_paged_attention_equals_contiguous_attention_on_the_unpaged_keys(q_len, kv_heads, block_size):
    q, k, v, k_pages, v_pages, table = case(q_len, kv_heads, block_size)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    if q_len == 1:  # a decode step: the default offset puts the query at the last key
        offset, passed = lengths - 1, None
    else:  # a chunk of a prefill at its own offset, before keys that causality must hide
        offset = jnp.asarray(np.maximum(LENGTHS - 3 * q_len // 2, 0), jnp.int32)
        passed = offset
    got = paged_attention(q, k_pages, v_pages, table, lengths, q_offset=passed)
    want = flash_attention(q, k, v, causal=True, q_offset=offset, kv_lengths=lengths, implementation="xla")
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [1, 6, 20])
def test_sliding_window_equals_the_contiguous_one(window):
    q, k, v, k_pages, v_pages, table = case(q_len=8, kv_heads=2, block_size=16, seed=3)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    got = paged_attention(q, k_pages, v_pages, table, lengths, sliding_window=window, implementation="xla")
    want = flash_attention(
        q, k, v, causal=True, sliding_window=window, q_offset=lengths - 8, kv_lengths=lengths, implementation="xla"
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_len", [1, 4])
def test_a_row_of_length_zero_returns_zeros(q_len):
    lengths = np.array([0, 9])
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads=2, block_size=16, lengths=lengths)
    got = paged_attention(q, k_pages, v_pages, table, jnp.asarray(lengths, jnp.int32))
    np.testing.assert_array_equal(got[0], 0.0)
    assert np.isfinite(got).all() and np.abs(got[1]).max() > 0


def test_it_jits_and_its_gradient_with_respect_to_q_is_finite():
    lengths = np.array([0, 5, 37, 16])
    q, _, _, k_pages, v_pages, table = case(q_len=8, kv_heads=2, block_size=16, lengths=lengths)
    lens = jnp.asarray(lengths, jnp.int32)

    def attend(q, k_pages, v_pages, table, lens):
        return paged_attention(q, k_pages, v_pages, table, lens, sliding_window=12)

    jitted = jax.jit(attend)(q, k_pages, v_pages, table, lens)
    np.testing.assert_allclose(jitted, attend(q, k_pages, v_pages, table, lens), rtol=0, atol=1e-5)
    loss = jax.jit(lambda *args: attend(*args).sum())
    grad = jax.grad(loss)(q, k_pages, v_pages, table, lens)
    assert grad.shape == q.shape and np.isfinite(grad).all()
    assert not grad[0].any()  # the empty row sees nothing


def test_bad_inputs_raise_errors_that_say_what_is_wrong():
    q, _, _, k_pages, v_pages, table = case(q_len=1, kv_heads=2, block_size=16)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    with pytest.raises(ValueError, match="kv_heads=2 must divide heads=3"):
        paged_attention(q[:, :, :3], k_pages, v_pages, table, lengths)
    with pytest.raises(ValueError, match=r"block_tables must be \(batch, max_blocks\)"):
        paged_attention(q, k_pages, v_pages, table.reshape(-1), lengths)
    with pytest.raises(ValueError, match="block_tables must hold integer block ids"):
        paged_attention(q, k_pages, v_pages, table.astype(jnp.float32), lengths)
    with pytest.raises(ValueError, match=r"lengths must be an int or one int per batch row, shape \(4,\)"):
        paged_attention(q, k_pages, v_pages, table, lengths[:2])
    with pytest.raises(ValueError, match="k_pages must be"):
        paged_attention(q, k_pages[0], v_pages, table, lengths)
    with pytest.raises(ValueError, match="must share one dtype"):
        paged_attention(q.astype(jnp.bfloat16), k_pages, v_pages, table, lengths)
    with pytest.raises(KernelUnavailable, match=r"unknown implementation 'pallas_mosaic'.*'xla', 'pallas_triton'"):
        paged_attention(q, k_pages, v_pages, table, lengths, implementation="pallas_mosaic")
    out = paged_attention(q, k_pages, v_pages, table, lengths, implementation="pallas")  # interpreted off-GPU
    np.testing.assert_allclose(out, paged_attention(q, k_pages, v_pages, table, lengths), atol=1e-5)
