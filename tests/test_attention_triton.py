"""The pallas_triton flash attention (run in Pallas's interpreter here) against the jnp reference."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.kernels.attention import FLASH_ATTENTION, AttentionBlocks, AttentionOptions, flash_attention
from mlsys_jax.kernels.attention import triton as triton_attention
from mlsys_jax.kernels.attention.reference import attention_reference_with_lse, visible
from mlsys_jax.kernels.dispatch import KernelUnavailable

# Small tiles so every case spans several blocks and ends on a partial one.
BLOCKS = AttentionBlocks(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def _segments(batch: int, seq: int, starts: list[int], offset: int = 0) -> jax.Array:
    """Document ids (batch, seq): a new document at each position in ``starts``."""
    ids = np.searchsorted(np.array(starts), np.arange(seq), side="right") + offset
    return jnp.asarray(np.stack([ids + 10 * b for b in range(batch)]), jnp.int32)


def _inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (batch, seq_q, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seq_k, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seq_k, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (batch, seq_q, heads, head_dim), jnp.float32).astype(dtype)
    return q, k, v, do


def _assert_close(actual, expected, tol, what):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


# Each factor (lengths off the block size, GQA ratio, head_dim, causal, segments, window, dtype)
# appears in some case; the full product would take minutes in the interpreter.
#        batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, window, segments, dtype
CASES = {
    "gqa2_unmasked_keys64": (1, 40, 64, 8, 4, 64, False, None, None, jnp.float32),
    "gqa4_causal_segments_d128": (2, 40, 40, 8, 2, 128, True, None, "self", jnp.float32),
    "mha_causal_window": (1, 48, 48, 8, 8, 64, True, 12, None, jnp.float32),
    "mqa8_cross_segments_with_empty_document": (2, 24, 72, 8, 1, 64, False, None, "cross", jnp.float32),
    "causal_window_queries_past_keys": (1, 40, 24, 8, 8, 64, True, 8, None, jnp.float32),
    "bf16_gqa4_causal": (1, 40, 40, 8, 2, 64, True, None, None, jnp.bfloat16),
    "fp16_mha_window_segments_d128": (1, 40, 40, 8, 8, 128, False, 12, "self", jnp.float16),
    "bf16_mqa8_causal_window_segments": (1, 40, 40, 8, 1, 64, True, 16, "self", jnp.bfloat16),
}


def _case(name):
    batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, window, segments, dtype = CASES[name]
    q, k, v, do = _inputs(batch, seq_q, seq_k, heads, kv_heads, head_dim, dtype)
    if segments == "self":
        seg = _segments(batch, seq_q, [13, 29])
        seg_pair = (seg, seg)
    elif segments == "cross":
        # Query document 2 (positions 18..23) has no key in the key segments: its rows are zeros.
        seg_pair = (_segments(batch, seq_q, [9, 18]), _segments(batch, seq_k, [30]))
    else:
        seg_pair = None
    opts = AttentionOptions(causal=causal, sm_scale=head_dim ** -0.5, window=window, blocks=BLOCKS,
                            interpret=True)
    return q, k, v, do, seg_pair, opts, TOL[dtype]


@pytest.mark.parametrize("name", list(CASES))
def test_output_and_gradients_match_reference(name):
    q, k, v, do, seg_pair, opts, tol = _case(name)

    def attend(impl):
        return lambda q, k, v: flash_attention(
            q, k, v, causal=opts.causal, sliding_window=opts.window, segment_ids=seg_pair,
            implementation=impl, blocks=BLOCKS)

    def with_grads(impl):
        def run(q, k, v, do):
            o, pull = jax.vjp(attend(impl), q, k, v)
            return (o, *pull(do))
        return jax.jit(run)

    got, want = with_grads("pallas_triton")(q, k, v, do), with_grads("xla")(q, k, v, do)
    for label, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert x.shape == ref.shape and x.dtype == ref.dtype, (label, x.shape, x.dtype, ref.dtype)
        _assert_close(x, ref, tol, label)


@functools.lru_cache(maxsize=None)
def _forward(name):
    """The kernel's and the reference's (o, lse) for one case."""
    q, k, v, _, seg_pair, opts, _ = _case(name)
    q_seg, kv_seg = seg_pair if seg_pair else (None, None)
    got = jax.jit(lambda q, k, v: triton_attention.forward(q, k, v, q_seg, kv_seg, None, None, opts))(q, k, v)
    want = attention_reference_with_lse(q, k, v, q_seg, kv_seg, None, None, opts)
    return got, want


@pytest.mark.parametrize("name", ["mqa8_cross_segments_with_empty_document",
                                  "causal_window_queries_past_keys", "bf16_mqa8_causal_window_segments"])
def test_forward_output_and_lse_match_reference(name):
    (o, lse), (o_ref, lse_ref) = _forward(name)
    tol = TOL[CASES[name][-1]]
    assert o.dtype == o_ref.dtype and lse.dtype == jnp.float32 and lse.shape == lse_ref.shape
    _assert_close(o, o_ref, tol, "o")
    empty = np.isinf(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isposinf(np.asarray(lse)), empty)
    _assert_close(np.where(empty, 0, lse), np.where(empty, 0, lse_ref), tol, "lse")


def test_query_without_visible_keys_gets_zeros_and_infinite_lse():
    (o, lse), _ = _forward("mqa8_cross_segments_with_empty_document")
    assert np.all(np.asarray(o[:, 18:]) == 0)
    assert np.all(np.isposinf(np.asarray(lse[:, :, 18:])))
    assert np.all(np.isfinite(np.asarray(lse[:, :, :18])))


def test_queries_past_the_window_of_every_key_get_zeros():
    (o, lse), _ = _forward("causal_window_queries_past_keys")  # 24 keys, window 8: queries >= 31
    assert np.all(np.asarray(o[:, 31:]) == 0) and np.all(np.isposinf(np.asarray(lse[:, :, 31:])))
    assert np.all(np.isfinite(np.asarray(lse[:, :, :31])))


def test_kv_heads_reach_the_kernels_unrepeated():
    q, k, v, do = _inputs(1, 24, 40, 8, 2, 64, jnp.float32)

    def loss(q, k, v):
        o = flash_attention(q, k, v, causal=True, implementation="pallas_triton", blocks=BLOCKS)
        return jnp.sum(o * do)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    shapes = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                shapes.extend(tuple(x.aval.shape) for x in eqn.invars)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a closed jaxpr's inner jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    assert shapes, "expected pallas_call in the traced gradient"
    assert (1, 48, 2, 64) in shapes  # k, v padded to whole blocks, still with 2 K/V heads
    assert not any(len(s) == 4 and s[1] in (40, 48) and s[2] == 8 for s in shapes)


@pytest.mark.parametrize("dtype,causal,window,segments,kv_heads", [
    (jnp.bfloat16, True, None, False, 2),
    (jnp.float32, False, 37, True, 3),
])
def test_kernels_lower_through_triton(dtype, causal, window, segments, kv_heads):
    """Lowering for CUDA runs Pallas's Triton lowering without a GPU: the kernels must pass it."""
    q = jax.ShapeDtypeStruct((2, 300, 6, 64), dtype)
    k = jax.ShapeDtypeStruct((2, 200, kv_heads, 64), dtype)
    segs = (jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 200), jnp.int32)) \
        if segments else None
    opts = AttentionOptions(causal=causal, sm_scale=0.125, window=window,
                            blocks=AttentionBlocks(block_q=128, block_k=64, num_warps=8, num_stages=3))

    def forward_backward(q, k, v, segs, do):
        q_seg, kv_seg = segs if segs else (None, None)
        o, lse = triton_attention.forward(q, k, v, q_seg, kv_seg, None, None, opts)
        return o, lse, triton_attention.backward(q, k, v, q_seg, kv_seg, None, None, o, lse, do, opts)

    exported = jax.export.export(
        jax.jit(forward_backward), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, k, k, segs, q)
    assert exported.mlir_module().count("xla.gpu.triton(") == 3  # forward, dK/dV, dQ


# --- block skipping -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _visibility(causal, window, size=64):
    return np.asarray(visible(jnp.arange(size)[:, None], jnp.arange(size)[None, :],
                              causal=causal, window=window))


def _tile_visibility(seq_q, seq_k, block_q, block_k, causal, window):
    mask = _visibility(causal, window)[:seq_q, :seq_k]
    nq, nk = -(-seq_q // block_q), -(-seq_k // block_k)
    return np.array([[mask[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
                      for j in range(nk)] for i in range(nq)])


MASKS = [(c, w) for c in (False, True) for w in (None, 1, 5, 16, 40)]
SHAPES = list(itertools.product((1, 16, 17, 40), (1, 15, 40, 64), ((16, 16), (16, 32), (32, 16))))


@pytest.mark.parametrize("causal,window", MASKS)
def test_block_ranges_visit_exactly_the_blocks_with_visible_entries(causal, window):
    for seq_q, seq_k, (block_q, block_k) in SHAPES:
        tiles = _tile_visibility(seq_q, seq_k, block_q, block_k, causal, window)
        where = (seq_q, seq_k, block_q, block_k, causal, window)
        for i, row in enumerate(tiles):
            lo, hi = triton_attention.key_block_range(i, block_q, block_k, seq_q, seq_k,
                                                      causal=causal, window=window)
            assert 0 <= lo <= hi <= len(row), (where, i, lo, hi)
            visited = (np.arange(len(row)) >= lo) & (np.arange(len(row)) < hi)
            np.testing.assert_array_equal(visited, row, err_msg=f"key blocks of query block {i}, {where}")
        for j, column in enumerate(tiles.T):
            lo, hi = triton_attention.query_block_range(j, block_q, block_k, seq_q, seq_k,
                                                        causal=causal, window=window)
            assert 0 <= lo <= hi <= len(column), (where, j, lo, hi)
            visited = (np.arange(len(column)) >= lo) & (np.arange(len(column)) < hi)
            np.testing.assert_array_equal(visited, column, err_msg=f"query blocks of key block {j}, {where}")


@pytest.mark.parametrize("causal,window", [(True, None), (True, 20), (False, 20)])
def test_block_ranges_agree_on_traced_block_indices(causal, window):
    """Inside kernels the block index is a program id or loop counter, not a Python int."""
    for block_range, seq_q, seq_k in ((triton_attention.key_block_range, 40, 100),
                                      (triton_attention.query_block_range, 100, 40)):
        ranges = functools.partial(block_range, block_q=16, block_k=16, seq_q=seq_q, seq_k=seq_k,
                                   causal=causal, window=window)
        traced = jax.jit(jax.vmap(lambda b: jnp.stack(ranges(b))))(jnp.arange(7, dtype=jnp.int32))
        np.testing.assert_array_equal(traced, [ranges(b) for b in range(7)])


# --- what the backend serves --------------------------------------------------------------------

def _args(**over):
    args = dict(dtype=jnp.float32, head_dim=64, seq_q=40, seq_k=40, heads=8, kv_heads=2,
                causal=True, segments=False, window=None)
    args.update(over)
    return args


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_check_accepts_power_of_two_head_dims_and_float_dtypes(head_dim, dtype):
    assert triton_attention.check(**_args(head_dim=head_dim, dtype=dtype, segments=True, window=7)) is None


@pytest.mark.parametrize("head_dim", [8, 24, 96, 512])
def test_check_names_an_unservable_head_dim(head_dim):
    why = triton_attention.check(**_args(head_dim=head_dim))
    assert why is not None and "head_dim" in why and str(head_dim) in why


def test_check_names_an_unservable_dtype():
    why = triton_attention.check(**_args(dtype=jnp.int8))
    assert why is not None and "int8" in why


def test_named_backend_on_gpu_raises_with_the_reason():
    with pytest.raises(KernelUnavailable, match="pallas_triton.*head_dim.*24"):
        FLASH_ATTENTION.choose("pallas_triton", platform="gpu", **_args(head_dim=24))
    assert FLASH_ATTENTION.choose("pallas_triton", platform="gpu", **_args()).interpret is False


def test_named_backend_runs_interpreted_on_cpu():
    choice = FLASH_ATTENTION.choose("pallas_triton", platform="cpu", **_args())
    assert choice.backend.name == "pallas_triton" and choice.interpret is True


def test_flash_attention_refuses_head_dim_the_kernels_cannot_tile():
    q, k, v, _ = _inputs(1, 16, 16, 2, 2, 24, jnp.float32)
    with pytest.raises(KernelUnavailable, match="head_dim"):
        flash_attention(q, k, v, implementation="pallas_triton", blocks=BLOCKS)


def test_blocks_that_are_not_triton_tiles_are_refused_by_name():
    q, k, v, _ = _inputs(1, 40, 40, 2, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="block_q=24"):
        flash_attention(q, k, v, implementation="pallas_triton", blocks=AttentionBlocks(block_q=24))


def test_short_sequences_get_the_smallest_covering_tile():
    assert triton_attention.effective_block(128, 40, "block_q") == 64
    assert triton_attention.effective_block(64, 5, "block_q") == 16
    assert triton_attention.effective_block(32, 1000, "block_q") == 32
