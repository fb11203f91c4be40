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
    # Rows placed by query offsets and cut by key-value lengths (see ROWS); head_dims 80 and 96
    # are zero-padded to a 128 tile inside the kernels.
    "gqa2_causal_chunks_continuing_rows": (3, 24, 64, 4, 2, 64, True, None, None, jnp.float32),
    "mqa4_causal_window_decode_against_cache": (3, 1, 72, 4, 1, 64, True, 16, None, jnp.float32),
    "bf16_gqa2_lengths_with_an_empty_row": (3, 40, 48, 4, 2, 64, False, None, None, jnp.bfloat16),
    "d80_window_offsets": (2, 40, 40, 4, 2, 80, False, 12, None, jnp.float32),
    "bf16_d96_causal_offsets_lengths_segments": (2, 40, 40, 4, 4, 96, True, None, "self", jnp.bfloat16),
}

# Per-row (q_offset, kv_lengths) of the cases above that have them; query i of row b sits at
# position q_offset[b] + i and sees no key at position >= kv_lengths[b].
ROWS = {
    # A 24-query chunk continuing a 40-token sequence, the first chunk of a prompt, a middle chunk.
    "gqa2_causal_chunks_continuing_rows": ([40, 0, 17], [64, 24, 41]),
    # One decoded token per row against a 72-slot cache; the last row's cache is empty.
    "mqa4_causal_window_decode_against_cache": ([70, 30, 0], [71, 31, 0]),
    "bf16_gqa2_lengths_with_an_empty_row": (None, [48, 0, 13]),
    "d80_window_offsets": ([0, 9], None),
    "bf16_d96_causal_offsets_lengths_segments": ([0, 6], [40, 33]),
}


def _case(name):
    """Inputs, segment ids, per-row (q_offset, kv_lengths), options and tolerance of one case."""
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
    q_offset, kv_lengths = ROWS.get(name, (None, None))
    rows = (
        None if q_offset is None else jnp.asarray(q_offset, jnp.int32),
        None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32),
    )
    opts = AttentionOptions(causal=causal, sm_scale=head_dim**-0.5, window=window, blocks=BLOCKS, interpret=True)
    return q, k, v, do, seg_pair, rows, opts, TOL[dtype]


@functools.cache
def _with_grads(name, impl):
    """The output and dq, dk, dv of one case through ``flash_attention`` with ``implementation=impl``."""
    q, k, v, do, seg_pair, (q_offset, kv_lengths), opts, _ = _case(name)

    def run(q, k, v, do):
        o, pull = jax.vjp(
            lambda q, k, v: flash_attention(
                q,
                k,
                v,
                causal=opts.causal,
                sliding_window=opts.window,
                segment_ids=seg_pair,
                q_offset=q_offset,
                kv_lengths=kv_lengths,
                implementation=impl,
                blocks=BLOCKS,
            ),
            q,
            k,
            v,
        )
        return (o, *pull(do))

    return jax.jit(run)(q, k, v, do)


@pytest.mark.parametrize("name", list(CASES))
def test_output_and_gradients_match_reference(name):
    got, want = _with_grads(name, "pallas_triton"), _with_grads(name, "xla")
    tol = TOL[CASES[name][-1]]
    for label, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        assert x.shape == ref.shape and x.dtype == ref.dtype, (label, x.shape, x.dtype, ref.dtype)
        _assert_close(x, ref, tol, label)


@functools.cache
def _forward(name):
    """The kernel's and the reference's (o, lse) for one case."""
    q, k, v, _, seg_pair, rows, opts, _ = _case(name)
    q_seg, kv_seg = seg_pair if seg_pair else (None, None)
    got = jax.jit(lambda q, k, v, rows: triton_attention.forward(q, k, v, q_seg, kv_seg, rows[0], rows[1], opts))(
        q, k, v, rows
    )
    want = attention_reference_with_lse(q, k, v, q_seg, kv_seg, *rows, opts)
    return got, want


@pytest.mark.parametrize(
    "name",
    [
        "mqa8_cross_segments_with_empty_document",
        "causal_window_queries_past_keys",
        "bf16_mqa8_causal_window_segments",
        "mqa4_causal_window_decode_against_cache",
        "bf16_gqa2_lengths_with_an_empty_row",
        "d80_window_offsets",
        "bf16_d96_causal_offsets_lengths_segments",
    ],
)
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


@pytest.mark.parametrize(
    "name,row", [("mqa4_causal_window_decode_against_cache", 2), ("bf16_gqa2_lengths_with_an_empty_row", 1)]
)
def test_a_row_without_visible_keys_gets_zeros_and_zero_gradients(name, row):
    (_, lse), _ = _forward(name)
    o, dq, dk, dv = _with_grads(name, "pallas_triton")
    for label, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not np.asarray(x[row], np.float32).any(), label
    assert np.all(np.isposinf(np.asarray(lse[row])))


@pytest.mark.parametrize("name", ["gqa2_causal_chunks_continuing_rows", "bf16_gqa2_lengths_with_an_empty_row"])
def test_keys_past_a_row_length_get_no_gradient(name):
    _, _, dk, dv = _with_grads(name, "pallas_triton")
    for row, length in enumerate(ROWS[name][1]):
        for label, x in (("dk", dk), ("dv", dv)):
            assert not np.asarray(x[row, length:], np.float32).any(), (label, row)


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


@pytest.mark.parametrize(
    "dtype,causal,window,segments,kv_heads,head_dim,offsets,lengths",
    [
        (jnp.bfloat16, True, None, False, 2, 64, False, False),
        (jnp.float32, False, 37, True, 3, 64, False, False),
        (jnp.bfloat16, True, 64, True, 2, 80, True, True),
        (jnp.float32, False, None, False, 6, 96, False, True),
        (jnp.float16, True, None, False, 1, 128, True, False),
    ],
)
def test_kernels_lower_through_triton(dtype, causal, window, segments, kv_heads, head_dim, offsets, lengths):
    """Lowering for CUDA runs Pallas's Triton lowering without a GPU: the kernels must pass it."""
    q = jax.ShapeDtypeStruct((2, 300, 6, head_dim), dtype)
    k = jax.ShapeDtypeStruct((2, 200, kv_heads, head_dim), dtype)
    segs = (jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 200), jnp.int32)) if segments else None
    row = jax.ShapeDtypeStruct((2,), jnp.int32)
    rows = (row if offsets else None, row if lengths else None)
    opts = AttentionOptions(
        causal=causal,
        sm_scale=0.125,
        window=window,
        blocks=AttentionBlocks(block_q=128, block_k=64, num_warps=8, num_stages=3),
    )

    def forward_backward(q, k, v, segs, rows, do):
        q_seg, kv_seg = segs if segs else (None, None)
        q_offset, kv_lengths = rows
        o, lse = triton_attention.forward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts)
        return o, lse, triton_attention.backward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, o, lse, do, opts)

    exported = jax.export.export(
        jax.jit(forward_backward),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, k, k, segs, rows, q)
    assert exported.mlir_module().count("xla.gpu.triton(") == 3  # forward, dK/dV, dQ


# --- block skipping -----------------------------------------------------------------------------


@functools.cache
def _visibility(causal, window, size=128):
    """Which key position (column) each query position (row) sees, before any key-value length."""
    return np.asarray(visible(jnp.arange(size)[:, None], jnp.arange(size)[None, :], causal=causal, window=window))


def _tile_visibility(seq_q, seq_k, block_q, block_k, causal, window, q_offset=None, kv_len=None):
    """Which (query block, key block) tiles hold a visible entry, queries starting at ``q_offset``."""
    start = q_offset or 0
    mask = _visibility(causal, window)[start : start + seq_q, :seq_k] & (
        np.arange(seq_k) < (seq_k if kv_len is None else kv_len)
    )
    nq, nk = -(-seq_q // block_q), -(-seq_k // block_k)
    return np.array(
        [
            [mask[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k].any() for j in range(nk)]
            for i in range(nq)
        ]
    )


MASKS = [(c, w) for c in (False, True) for w in (None, 1, 5, 16, 40)]
SHAPES = list(itertools.product((1, 16, 17, 40), (1, 15, 40, 64), ((16, 16), (16, 32), (32, 16))))
# (q_offset, kv_len) per row: none, a chunk or token past the start, lengths cutting the keys
# short (to nothing, mid-block, past the end), and both at once.
ROW_BOUNDS = [
    (None, None),
    (3, None),
    (33, None),
    (80, None),
    (None, 0),
    (None, 9),
    (None, 70),
    (24, 0),
    (24, 17),
    (50, 40),
    (87, 64),
]


@pytest.mark.parametrize("causal,window", MASKS)
def test_block_ranges_visit_exactly_the_blocks_with_visible_entries(causal, window):
    for (seq_q, seq_k, (block_q, block_k)), (q_offset, kv_len) in itertools.product(SHAPES, ROW_BOUNDS):
        tiles = _tile_visibility(seq_q, seq_k, block_q, block_k, causal, window, q_offset, kv_len)
        where = (seq_q, seq_k, block_q, block_k, causal, window, q_offset, kv_len)
        bounds = {"causal": causal, "window": window, "q_offset": q_offset, "kv_len": kv_len}
        for i, row in enumerate(tiles):
            lo, hi = triton_attention.key_block_range(i, block_q, block_k, seq_q, seq_k, **bounds)
            assert 0 <= lo <= hi <= len(row), (where, i, lo, hi)
            visited = (np.arange(len(row)) >= lo) & (np.arange(len(row)) < hi)
            np.testing.assert_array_equal(visited, row, err_msg=f"key blocks of query block {i}, {where}")
        for j, column in enumerate(tiles.T):
            lo, hi = triton_attention.query_block_range(j, block_q, block_k, seq_q, seq_k, **bounds)
            assert 0 <= lo <= hi <= len(column), (where, j, lo, hi)
            visited = (np.arange(len(column)) >= lo) & (np.arange(len(column)) < hi)
            np.testing.assert_array_equal(visited, column, err_msg=f"query blocks of key block {j}, {where}")


@pytest.mark.parametrize("causal,window", [(True, None), (True, 20), (False, 20), (False, None)])
@pytest.mark.parametrize("q_offset,kv_len", [(None, None), (30, None), (None, 0), (30, 45)])
def test_block_ranges_agree_on_traced_block_indices(causal, window, q_offset, kv_len):
    """Inside kernels the block index is a program id or loop counter, and the offset and length
    a row's scalars, not Python ints."""
    traced_row = lambda x: None if x is None else jnp.int32(x)
    for block_range, seq_q, seq_k in (
        (triton_attention.key_block_range, 40, 100),
        (triton_attention.query_block_range, 100, 40),
    ):
        ranges = functools.partial(
            block_range, block_q=16, block_k=16, seq_q=seq_q, seq_k=seq_k, causal=causal, window=window
        )
        traced = jax.jit(
            jax.vmap(lambda b, r=ranges: jnp.stack(r(b, q_offset=traced_row(q_offset), kv_len=traced_row(kv_len))))
        )(jnp.arange(7, dtype=jnp.int32))
        np.testing.assert_array_equal(traced, [ranges(b, q_offset=q_offset, kv_len=kv_len) for b in range(7)])


# --- what the backend serves --------------------------------------------------------------------


def _args(**over):
    args = {
        "dtype": jnp.float32,
        "head_dim": 64,
        "seq_q": 40,
        "seq_k": 40,
        "heads": 8,
        "kv_heads": 2,
        "causal": True,
        "segments": False,
        "window": None,
    }
    args.update(over)
    return args


@pytest.mark.parametrize("head_dim", [8, 16, 24, 64, 80, 96, 128, 200, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_check_accepts_head_dims_that_are_multiples_of_8_and_float_dtypes(head_dim, dtype):
    assert triton_attention.check(**_args(head_dim=head_dim, dtype=dtype, segments=True, window=7)) is None


def test_check_accepts_query_offsets_and_key_value_lengths():
    assert triton_attention.check(**_args(offsets=True, lengths=True, window=7)) is None
    pick = FLASH_ATTENTION.choose(None, platform="gpu", **_args(dtype=jnp.bfloat16, offsets=True, lengths=True))
    assert pick.backend.name == "pallas_triton"  # cuDNN takes no query offsets


@pytest.mark.parametrize("head_dim", [4, 20, 100, 264, 512])
def test_check_names_an_unservable_head_dim(head_dim):
    why = triton_attention.check(**_args(head_dim=head_dim))
    assert why is not None and "head_dim" in why and "multiple of 8 up to 256" in why and str(head_dim) in why


def test_check_names_an_unservable_dtype():
    why = triton_attention.check(**_args(dtype=jnp.int8))
    assert why is not None and "int8" in why


def test_named_backend_on_gpu_raises_with_the_reason():
    with pytest.raises(KernelUnavailable, match="pallas_triton.*head_dim.*20"):
        FLASH_ATTENTION.choose("pallas_triton", platform="gpu", **_args(head_dim=20))
    assert FLASH_ATTENTION.choose("pallas_triton", platform="gpu", **_args()).interpret is False


def test_named_backend_runs_interpreted_on_cpu():
    choice = FLASH_ATTENTION.choose("pallas_triton", platform="cpu", **_args())
    assert choice.backend.name == "pallas_triton" and choice.interpret is True


def test_flash_attention_refuses_head_dim_the_kernels_cannot_tile():
    q, k, v, _ = _inputs(1, 16, 16, 2, 2, 20, jnp.float32)
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
