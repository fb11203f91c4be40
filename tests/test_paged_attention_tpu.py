"""The ``pallas_tpu`` paged-attention kernel, run in the TPU interpreter on CPU, equals the jnp
reference: grouped heads, ragged lengths with partially filled blocks in shuffled physical blocks,
decode steps and chunks at an offset, a sliding window, rows that see no key, bf16, and int8
pools widened by their per-block scales. Its gradient is the reference's, and dispatch picks it
on a TPU only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_paged_attention import LENGTHS, case

from mlsys_jax.kernels import KernelUnavailable
from mlsys_jax.kernels.paged_attention import PAGED_ATTENTION as REGISTRY
from mlsys_jax.kernels.paged_attention import Int8Pages, choose, paged_attention, quantize_blocks, tpu
from mlsys_jax.kernels.paged_attention.reference import paged_attention_reference

CHUNK_OFFSET = np.maximum(LENGTHS - 6, 0)  # a chunk's queries before keys causality must hide


def written(table: jax.Array, lengths: np.ndarray, num_blocks: int, block_size: int) -> np.ndarray:
    """(num_blocks, block_size) bools: the pool slots that hold one of some row's keys."""
    mask = np.zeros((num_blocks, block_size), bool)
    for b, length in enumerate(lengths):
        for j in range(-(-int(length) // block_size)):
            mask[int(table[b, j]), : min(block_size, int(length) - j * block_size)] = True
    return mask


def int8_pools(k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: np.ndarray):
    """The pools quantized per block and head, their unwritten slots zeroed first (garbage there
    would set the scales)."""
    mask = written(table, lengths, *k_pages.shape[:2])[:, :, None, None]
    return tuple(quantize_blocks(jnp.where(mask, x, 0.0)) for x in (k_pages, v_pages))


def unpack(pages: jax.Array | Int8Pages) -> tuple[jax.Array, jax.Array | None]:
    """A pool as a backend takes it: (values, scales), scales None for a float pool."""
    return (pages.values, pages.scale) if isinstance(pages, Int8Pages) else (pages, None)


def run_both(q, k_pages, v_pages, table, lengths, q_offset, window=None):
    """The kernel through the public function (named, so interpreted on CPU) and the reference,
    both given the same pools (int8 ones with their scales)."""
    lengths, q_offset = jnp.asarray(lengths, jnp.int32), jnp.asarray(q_offset, jnp.int32)
    got = paged_attention(
        q, k_pages, v_pages, table, lengths, q_offset=q_offset, sliding_window=window, implementation="pallas_tpu"
    )
    (k, k_scales), (v, v_scales) = unpack(k_pages), unpack(v_pages)
    want = paged_attention_reference(
        q,
        k,
        v,
        table,
        lengths,
        q_offset,
        sm_scale=q.shape[-1] ** -0.5,
        window=window,
        k_scales=k_scales,
        v_scales=v_scales,
    )
    return got, want


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["group1", "group2", "group4"])
@pytest.mark.parametrize("q_len", [1, 8], ids=["decode", "chunk"])
def test_the_kernel_equals_the_reference(q_len, kv_heads, block_size):
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads, block_size)
    offset = LENGTHS - 1 if q_len == 1 else CHUNK_OFFSET
    got, want = run_both(q, k_pages, v_pages, table, LENGTHS, offset)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [1, 6, 20])
def test_a_sliding_window_equals_the_reference(window):
    q, _, _, k_pages, v_pages, table = case(q_len=8, kv_heads=2, block_size=16, seed=3)
    got, want = run_both(q, k_pages, v_pages, table, LENGTHS, CHUNK_OFFSET, window=window)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q_len", [1, 4])
def test_a_row_that_sees_no_key_gets_zeros(q_len):
    lengths = np.array([0, 9, 3])
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads=2, block_size=16, lengths=lengths)
    # Row 0 has no keys; with window 1, row 2's chunk starts at 3, past its keys 0..2.
    offset = np.array([-q_len, 9 - q_len, 3])
    for window in (None, 1):
        got, want = run_both(q, k_pages, v_pages, table, lengths, offset, window=window)
        np.testing.assert_array_equal(got[0], 0.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)


def test_table_entries_past_a_rows_blocks_may_hold_anything():
    q, _, _, k_pages, v_pages, table = case(q_len=1, kv_heads=2, block_size=16)
    used = -(-LENGTHS // 16)
    past = np.arange(table.shape[1])[None] >= used[:, None]
    junk = np.where(past, np.resize([-1, 10**6, -(10**6)], table.shape), np.asarray(table))
    got, want = run_both(q, k_pages, v_pages, jnp.asarray(junk, jnp.int32), LENGTHS, LENGTHS - 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_bfloat16_equals_the_reference():
    q, _, _, k_pages, v_pages, table = case(q_len=8, kv_heads=2, block_size=16, seed=5)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k_pages, v_pages))
    got, want = run_both(q16, k16, v16, table, LENGTHS, CHUNK_OFFSET, window=12)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=0, atol=2e-2)


@pytest.mark.parametrize(
    ("q_len", "kv_heads", "block_size", "window", "dtype"),
    [(1, 4, 16, None, jnp.float32), (8, 1, 32, 20, jnp.float32), (8, 2, 16, None, jnp.bfloat16)],
    ids=["decode-group1-bs16", "chunk-group4-bs32-window", "chunk-group2-bs16-bf16"],
)
def test_int8_pools_equal_the_reference_on_the_same_pools(q_len, kv_heads, block_size, window, dtype):
    q, _, _, k_pages, v_pages, table = case(q_len, kv_heads, block_size)
    k8, v8 = int8_pools(k_pages, v_pages, table, LENGTHS)
    offset = LENGTHS - 1 if q_len == 1 else CHUNK_OFFSET
    got, want = run_both(q.astype(dtype), k8, v8, table, LENGTHS, offset, window=window)
    assert got.dtype == dtype
    # Both widen each block identically, so only the summation order differs.
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=0, atol=atol)


def _loss(impl: str, table, lengths, offset):
    def loss(q, k_pages, v_pages):
        out = paged_attention(
            q, k_pages, v_pages, table, lengths, q_offset=offset, sliding_window=12, implementation=impl
        )
        return (out**2).sum()

    return loss


def test_the_gradient_is_the_references_for_float_and_int8_pools():
    lengths = np.array([0, 5, 37])
    q, _, _, k_pages, v_pages, table = case(q_len=4, kv_heads=2, block_size=16, lengths=lengths, seed=5)
    lens, offset = jnp.asarray(lengths, jnp.int32), jnp.asarray(np.maximum(lengths - 4, 0), jnp.int32)
    got = jax.grad(_loss("pallas_tpu", table, lens, offset), argnums=(0, 1, 2))(q, k_pages, v_pages)
    want = jax.grad(_loss("xla", table, lens, offset), argnums=(0, 1, 2))(q, k_pages, v_pages)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    assert not got[0][0].any()  # the empty row sees nothing

    # int8 pools: q and the scales get the reference's gradient, the int8 values none (float0).
    k8, v8 = int8_pools(k_pages, v_pages, table, lengths)
    got = jax.grad(_loss("pallas_tpu", table, lens, offset), argnums=(0, 1, 2), allow_int=True)(q, k8, v8)
    want = jax.grad(_loss("xla", table, lens, offset), argnums=(0, 1, 2), allow_int=True)(q, k8, v8)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.values.dtype == jax.dtypes.float0
        np.testing.assert_allclose(g.scale, w.scale, rtol=1e-5, atol=1e-5)


def test_block_range_covers_exactly_the_blocks_with_a_visible_key():
    def blocks(length, q_offset, q_len=1, window=None):
        first, end = tpu.block_range(length, q_offset, q_len=q_len, block_size=16, max_blocks=4, window=window)
        return int(first), int(end)

    assert blocks(37, 36) == (0, 3)  # decode: keys 0..36 in blocks 0..2
    assert blocks(37, 20, q_len=4) == (0, 2)  # a chunk's last query (23) caps it before its length
    assert blocks(37, 36, window=6) == (1, 3)  # the window starts at key 31, in block 1
    assert blocks(0, -1) == (0, 0)  # no keys: nothing to fetch or compute
    assert blocks(3, 20, window=1) == (1, 1)  # the window starts in a block past the row's keys
    assert blocks(3, 3, window=1) == (0, 1)  # the same block: whole blocks are fetched, masks hide keys
    assert blocks(100, 99) == (0, 4)  # more keys than the table holds: clipped to it


@pytest.mark.parametrize(
    ("dtype", "pages_dtype", "kv_heads"), [(jnp.float32, jnp.float32, 2), (jnp.bfloat16, jnp.int8, 8)]
)
def test_it_lowers_to_mosaic_with_block_shapes_a_tpu_accepts(dtype, pages_dtype, kv_heads):
    """Exported for TPU on CPU: Pallas checks each block against the TPU's (8, 128) tiling."""
    S = jax.ShapeDtypeStruct
    q, pool = S((4, 2, 8, 128), dtype), S((40, 16, kv_heads, 128), pages_dtype)
    rows, table = S((4,), jnp.int32), S((4, 10), jnp.int32)
    scales = S((40, kv_heads), jnp.float32) if pages_dtype == jnp.int8 else None

    def attend(q, k, v, table, lengths, offset, k_scales, v_scales):
        return tpu.paged_attention_tpu(
            q, k, v, table, lengths, offset, sm_scale=0.1, window=7, k_scales=k_scales, v_scales=v_scales
        )

    exported = export.export(jax.jit(attend), platforms=["tpu"])(q, pool, pool, table, rows, rows, scales, scales)
    assert "tpu_custom_call" in exported.mlir_module()


def test_dispatch_picks_it_on_a_tpu_and_by_name_elsewhere():
    q, _, _, k_pages, _, _ = case(q_len=1, kv_heads=2, block_size=16)
    assert choose(q, k_pages).backend.name == "xla"  # CPU: the reference unless named
    choice = choose(q, k_pages, implementation="pallas_tpu")
    assert choice.backend is tpu.BACKEND and choice.interpret
    base = {"dtype": jnp.bfloat16, "head_dim": 128, "q_len": 1, "heads": 8, "kv_heads": 2, "block_size": 16}
    for pages_dtype in (jnp.bfloat16, jnp.int8):
        choice = REGISTRY.choose(None, platform="tpu", **base, pages_dtype=pages_dtype, window=None)
        assert choice.backend is tpu.BACKEND and not choice.interpret
    # Where it cannot serve, a TPU falls back to the reference and says why.
    choice = REGISTRY.choose(None, platform="tpu", **{**base, "block_size": 12}, window=None)
    assert choice.backend.name == "xla" and choice.passed_over[0][0] == "pallas_tpu"
    with pytest.raises(KernelUnavailable, match="multiple of 8 sublanes"):
        REGISTRY.choose("pallas_tpu", platform="cpu", **{**base, "block_size": 12}, window=None)


def test_arguments_it_cannot_serve_are_refused_with_the_reason():
    base = {"dtype": jnp.float32, "head_dim": 64, "q_len": 1, "heads": 8, "kv_heads": 2, "block_size": 16}
    assert tpu.check(**base) is None
    assert tpu.check(**base, pages_dtype=jnp.int8) is None
    assert "no float16 arithmetic" in str(tpu.check(**{**base, "dtype": jnp.float16}))
    assert "float32 or bfloat16" in str(tpu.check(**{**base, "dtype": jnp.int8}))
    assert "q's dtype or int8" in str(tpu.check(**base, pages_dtype=jnp.bfloat16))
    assert "block_size a multiple of 8" in str(tpu.check(**{**base, "block_size": 12}))
    assert f"at most {tpu.MAX_QUERY_ROWS}" in str(tpu.check(**{**base, "q_len": 512}))
