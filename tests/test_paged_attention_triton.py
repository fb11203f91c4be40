"""The ``pallas_triton`` paged-attention kernel, interpreted on CPU, equals the jnp reference: grouped
heads, ragged lengths with partially filled blocks in shuffled physical blocks, decode steps and
chunks at an offset, a sliding window, rows that see no key, and int8 pools widened by their
per-block scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_paged_attention import LENGTHS, case
from test_paged_attention_tpu import int8_pools, unpack

from mlsys_jax.kernels import KernelUnavailable
from mlsys_jax.kernels.paged_attention import PAGED_ATTENTION as REGISTRY
from mlsys_jax.kernels.paged_attention import choose, paged_attention, triton
from mlsys_jax.kernels.paged_attention.reference import paged_attention_reference


def run_both(q, k_pages, v_pages, table, lengths, q_offset, window=None):
    """The kernel (chosen by name through dispatch, so interpreted on CPU) and the reference,
    both given the same pools (int8 ones with their scales)."""
    choice = choose(q, k_pages, sliding_window=window, implementation="pallas_triton")
    assert choice.backend is triton.BACKEND and choice.interpret
    (k, k_scales), (v, v_scales) = unpack(k_pages), unpack(v_pages)
    kwargs = {"sm_scale": q.shape[-1] ** -0.5, "window": window, "k_scales": k_scales, "v_scales": v_scales}
    args = (q, k, v, table, jnp.asarray(lengths, jnp.int32), jnp.asarray(q_offset, jnp.int32))
    return choice(*args, **kwargs), paged_attention_reference(*args, **kwargs)


@pytest.mark.parametrize(
    ("q_len", "kv_heads", "block_size", "head_dim"),
    [
        (1, 4, 16, 16),  # decode, group 1
        (1, 1, 32, 32),  # decode, group 4 (multi-query)
        (4, 2, 16, 32),  # chunk, group 2
        (4, 1, 32, 24),  # chunk, group 4, head_dim padded to a 32 tile
    ],
    ids=["decode-group1-bs16", "decode-group4-bs32", "chunk-group2-bs16", "chunk-group4-bs32-d24"],
)
def test_the_kernel_equals_the_reference(q_len, kv_heads, block_size, head_dim):
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads, block_size, head_dim=head_dim)
    # Decode: the query at each row's last key. Chunk: queries before keys causality must hide.
    offset = LENGTHS - 1 if q_len == 1 else np.maximum(LENGTHS - 6, 0)
    got, want = run_both(q, k_pages, v_pages, table, LENGTHS, offset)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [1, 6, 20])
def test_a_sliding_window_equals_the_reference(window):
    q, _, _, k_pages, v_pages, table = case(q_len=4, kv_heads=2, block_size=16, seed=3)
    got, want = run_both(q, k_pages, v_pages, table, LENGTHS, LENGTHS - 4, window=window)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_len", [1, 4])
def test_a_row_that_sees_no_key_gets_zeros(q_len):
    lengths = np.array([0, 9, 3])
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads=2, block_size=16, lengths=lengths)
    # Row 2's chunk starts past its keys' window: q_offset 3, window 1 hides keys 0..2 from all.
    offset = np.array([-q_len, 9 - q_len, 3])
    got, want = run_both(q, k_pages, v_pages, table, lengths, offset)
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    got, want = run_both(q, k_pages, v_pages, table, lengths, offset, window=1)
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bfloat16_output_and_the_gradient_match_the_reference():
    lengths = np.array([5, 37])
    q, _, _, k_pages, v_pages, table = case(q_len=4, kv_heads=2, block_size=16, lengths=lengths, seed=5)
    offset = jnp.asarray(lengths - 4, jnp.int32)
    lens = jnp.asarray(lengths, jnp.int32)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k_pages, v_pages))
    got, want = run_both(q16, k16, v16, table, lengths, offset)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=0, atol=2e-2)

    def loss(fn, **kw):
        return lambda q, k, v: (fn(q, k, v, table, lens, offset, sm_scale=0.25, window=12, **kw) ** 2).sum()

    got = jax.grad(loss(triton.paged_attention_triton, interpret=True), argnums=(0, 1, 2))(q, k_pages, v_pages)
    want = jax.grad(loss(paged_attention_reference), argnums=(0, 1, 2))(q, k_pages, v_pages)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("q_len", "kv_heads", "block_size", "window", "dtype"),
    [(1, 4, 16, None, jnp.float32), (4, 1, 32, 20, jnp.float32), (4, 2, 16, None, jnp.bfloat16)],
    ids=["decode-group1-bs16", "chunk-group4-bs32-window", "chunk-group2-bs16-bf16"],
)
def test_int8_pools_equal_the_reference_on_the_same_pools(q_len, kv_heads, block_size, window, dtype):
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads, block_size)
    k8, v8 = int8_pools(k_pages, v_pages, table, LENGTHS)
    offset = LENGTHS - 1 if q_len == 1 else np.maximum(LENGTHS - 6, 0)
    got, want = run_both(q.astype(dtype), k8, v8, table, LENGTHS, offset, window=window)
    assert got.dtype == dtype
    # Both widen each block identically, so only the summation order differs.
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=0, atol=atol)


def test_with_int8_pools_q_and_the_scales_get_the_references_gradient():
    lengths = np.array([0, 5, 37])
    q, _, _, k_pages, v_pages, table = case(q_len=4, kv_heads=2, block_size=16, lengths=lengths, seed=5)
    k8, v8 = int8_pools(k_pages, v_pages, table, lengths)
    lens, offset = jnp.asarray(lengths, jnp.int32), jnp.asarray(np.maximum(lengths - 4, 0), jnp.int32)

    def loss(impl):
        def of(q, k8, v8):
            out = paged_attention(q, k8, v8, table, lens, q_offset=offset, sliding_window=12, implementation=impl)
            return (out**2).sum()

        return of

    got = jax.grad(loss("pallas_triton"), argnums=(0, 1, 2), allow_int=True)(q, k8, v8)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2), allow_int=True)(q, k8, v8)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    assert not got[0][0].any()  # the empty row sees nothing
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.values.dtype == jax.dtypes.float0  # int8 values get no cotangent
        np.testing.assert_allclose(g.scale, w.scale, rtol=1e-5, atol=1e-5)


def test_arguments_it_cannot_serve_are_refused_with_the_reason():
    base = {"dtype": jnp.float32, "head_dim": 64, "q_len": 1, "heads": 8, "kv_heads": 2, "block_size": 16}
    assert triton.check(**base) is None
    assert triton.check(**base, pages_dtype=jnp.int8) is None  # int8 pools are widened in the kernel
    assert "q's dtype or int8" in str(triton.check(**base, pages_dtype=jnp.float16))
    assert "block_size a power of two" in str(triton.check(**{**base, "block_size": 8}))
    assert "head_dim a multiple of 8" in str(triton.check(**{**base, "head_dim": 20}))
    assert "float32, bfloat16 or float16" in str(triton.check(**{**base, "dtype": jnp.int8}))
    assert f"at most {triton.MAX_ROWS}" in str(triton.check(**{**base, "q_len": 64}))
    # On a GPU it leads the order; where it cannot serve, dispatch falls back to the reference.
    choice = REGISTRY.choose(None, platform="gpu", **{**base, "q_len": 64}, window=None)
    assert choice.backend.name == "xla" and choice.passed_over[0][0] == "pallas_triton"
    with pytest.raises(KernelUnavailable, match="block_size a power of two"):
        REGISTRY.choose("pallas_triton", platform="cpu", **{**base, "block_size": 8}, window=None)
