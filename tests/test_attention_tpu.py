"""The pallas_tpu flash attention, run in the TPU interpreter, against the jnp reference.

Each case compiles three interpreted kernels, which is slow on CPU, so the cases cover each
factor (GQA ratio, head_dim, causal, window, segments, dtype, off-block lengths, query offsets,
key-value lengths) once or twice rather than their product.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.kernels.attention import AttentionBlocks, AttentionOptions, flash_attention
from mlsys_jax.kernels.attention import tpu as attention_tpu
from mlsys_jax.kernels.attention.reference import attention_reference_with_lse, visible
from mlsys_jax.kernels.dispatch import KernelUnavailable

SMALL = AttentionBlocks(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32)
TINY = AttentionBlocks(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}


def _inputs(seq_q, seq_k, heads, kv_heads, head_dim, dtype, seed=0, batch=1):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, seq_q, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seq_k, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seq_k, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, q.shape, jnp.float32).astype(dtype)
    return q, k, v, do


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol, err_msg=what)


def _rows(mask):
    """The mask's per-row (q_offset, kv_lengths) as the backends take them: int32 arrays or None."""

    def row(name):
        return None if mask.get(name) is None else jnp.asarray(mask[name], jnp.int32)

    return row("q_offset"), row("kv_lengths")


def _assert_matches_reference(q, k, v, do, blocks, **mask):
    """Output, lse and (dq, dk, dv) of pallas_tpu equal the reference's; returns the output and
    the gradients."""
    tol = TOL[q.dtype.type]
    mask = {**mask, **dict(zip(("q_offset", "kv_lengths"), _rows(mask)))}
    opts = AttentionOptions(
        causal=mask.get("causal", False),
        sm_scale=q.shape[-1] ** -0.5,
        window=mask.get("sliding_window"),
        blocks=blocks,
        interpret=True,
    )
    segs = mask.get("segment_ids")
    q_seg, kv_seg = segs if isinstance(segs, tuple) else (segs, segs)

    def attend(impl):
        return lambda q, k, v: flash_attention(q, k, v, implementation=impl, blocks=blocks, **mask)

    out, vjp = jax.vjp(attend("pallas_tpu"), q, k, v)
    want_out, want_vjp = jax.vjp(attend("xla"), q, k, v)
    _close(out, want_out, tol, "output")
    grads = vjp(do)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_vjp(do)):
        assert got.dtype == want.dtype == q.dtype, name
        _close(got, want, tol, name)

    _, lse = attention_tpu.forward(q, k, v, q_seg, kv_seg, *_rows(mask), opts)
    _, want_lse = attention_reference_with_lse(q, k, v, q_seg, kv_seg, *_rows(mask), opts)
    assert lse.dtype == jnp.float32 and lse.shape == want_lse.shape
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    finite = np.isfinite(np.asarray(want_lse))
    _close(np.asarray(lse)[finite], np.asarray(want_lse)[finite], 1e-4, "lse")
    return out, grads


# --- numerics against the reference ------------------------------------------------------------


@pytest.mark.parametrize(
    "kv_heads, head_dim, dtype, blocks, mask",
    [
        # multi-head, 40 = 2 blocks of 32 after padding
        (8, 64, jnp.float32, SMALL, {}),
        # GQA 2, causal sliding window: blocks of 16 over 40 positions leave whole tiles hidden
        (4, 128, jnp.float32, TINY, {"causal": True, "sliding_window": 12}),
        # GQA 4, causal
        (2, 64, jnp.float32, SMALL, {"causal": True}),
        # multi-query, two-sided sliding window, bf16
        (1, 128, jnp.bfloat16, TINY, {"sliding_window": 12}),
    ],
    ids=["mha", "gqa2-causal-window", "gqa4-causal", "mqa-window-bf16"],
)
def test_matches_reference_across_gqa_ratios_and_masks(kv_heads, head_dim, dtype, blocks, mask):
    q, k, v, do = _inputs(40, 40, 8, kv_heads, head_dim, dtype, seed=kv_heads)
    _assert_matches_reference(q, k, v, do, blocks, **mask)


def test_segments_with_a_query_that_sees_no_key_get_zeros_and_infinite_lse():
    q, k, v, do = _inputs(40, 40, 4, 2, 64, jnp.bfloat16, seed=5)
    q_seg = jnp.array([[0] * 12 + [1] * 20 + [3] * 8], jnp.int32)  # id 3 has no keys
    kv_seg = jnp.array([[0] * 12 + [1] * 28], jnp.int32)
    out, _ = _assert_matches_reference(q, k, v, do, SMALL, segment_ids=(q_seg, kv_seg))
    assert np.all(np.asarray(out[:, 32:], np.float32) == 0.0)
    opts = AttentionOptions(causal=False, sm_scale=64**-0.5, blocks=SMALL, interpret=True)
    _, lse = attention_tpu.forward(q, k, v, q_seg, kv_seg, None, None, opts)
    assert np.all(np.isposinf(np.asarray(lse[:, :, 32:])))
    assert np.all(np.isfinite(np.asarray(lse[:, :, :32])))


@pytest.mark.parametrize(
    "head_dim, dtype, mask",
    [
        (80, jnp.float32, {"causal": True}),
        (96, jnp.bfloat16, {"sliding_window": 8, "kv_lengths": [19]}),
    ],
)
def test_head_dims_off_the_lane_width_match_reference(head_dim, dtype, mask):
    # Zero-padded to 128 lanes inside the kernels and sliced back; sm_scale keeps the real width.
    q, k, v, do = _inputs(24, 24, 4, 2, head_dim, dtype, seed=head_dim)
    _assert_matches_reference(q, k, v, do, TINY, **mask)


# --- query offsets and key-value lengths: one value per batch row ----------------------------------

MIXED = AttentionBlocks(block_q=8, block_k=16, block_q_bwd=8, block_k_bwd=16)


@pytest.mark.parametrize(
    "kv_heads, dtype, mask",
    [
        # chunks of 16 queries continuing a 40-key sequence: its last chunk, its first (the keys
        # after it hidden by causality, whole blocks of them) and one in the middle
        (2, jnp.float32, {"causal": True, "q_offset": [24, 0, 9]}),
        # the same chunks under a causal window, over caches filled to different lengths
        (1, jnp.float32, {"causal": True, "sliding_window": 8, "q_offset": [24, 0, 9], "kv_lengths": [40, 16, 20]}),
        # lengths alone; the last row's queries see no key
        (4, jnp.bfloat16, {"kv_lengths": [5, 40, 0]}),
        # a two-sided window placed by offsets: queries mostly past the keys, inside, mostly before
        (2, jnp.float32, {"sliding_window": 6, "q_offset": [30, 3, -10]}),
    ],
    ids=["gqa2-causal-chunks", "mqa-causal-window-chunks-lengths", "mha-lengths-bf16", "gqa2-window-offsets"],
)
def test_query_offsets_and_kv_lengths_match_reference(kv_heads, dtype, mask):
    q, k, v, do = _inputs(16, 40, 4, kv_heads, 64, dtype, seed=kv_heads, batch=3)
    _assert_matches_reference(q, k, v, do, MIXED, **mask)


def test_decoded_tokens_see_their_cache_and_an_empty_cache_gives_zeros_and_no_gradient():
    # One token per row at the end of caches 40, 17 and 0 keys long, in 40-key buffers.
    q, k, v, do = _inputs(1, 40, 4, 2, 64, jnp.float32, seed=7, batch=3)
    mask = {"causal": True, "q_offset": [39, 16, 0], "kv_lengths": [40, 17, 0]}
    out, (dq, dk, dv) = _assert_matches_reference(q, k, v, do, TINY, **mask)
    assert not np.asarray(out[2]).any() and not np.asarray(dq[2]).any()
    assert not np.asarray(dk[2]).any() and not np.asarray(dv[2]).any()
    assert not np.asarray(dk[1, 17:]).any() and not np.asarray(dv[1, 17:]).any()
    opts = AttentionOptions(causal=True, sm_scale=64**-0.5, blocks=TINY, interpret=True)
    _, lse = attention_tpu.forward(q, k, v, None, None, *_rows(mask), opts)
    assert np.all(np.isposinf(np.asarray(lse[2]))) and np.all(np.isfinite(np.asarray(lse[:2])))


def test_key_blocks_no_query_can_see_are_never_read():
    # Causal cross-attention, 16 queries over 48 keys: key blocks 1 and 2 are hidden from every
    # query. NaN there would poison the output and gradients if such a tile were ever computed.
    q, k, v, do = _inputs(16, 48, 2, 1, 64, jnp.float32, seed=4)
    k_nan, v_nan = (x.at[:, 16:].set(jnp.nan) for x in (k, v))

    def attend(impl, blocks=None):
        return lambda q, k, v: flash_attention(q, k, v, causal=True, implementation=impl, blocks=blocks)

    out, vjp = jax.vjp(attend("pallas_tpu", TINY), q, k_nan, v_nan)
    want, want_vjp = jax.vjp(attend("xla"), q, k[:, :16], v[:, :16])
    _close(out, want, 2e-5, "output")
    dq, dk, dv = vjp(do)
    want_dq, want_dk, want_dv = want_vjp(do)
    _close(dq, want_dq, 2e-5, "dq")
    _close(dk[:, :16], want_dk, 2e-5, "dk")
    _close(dv[:, :16], want_dv, 2e-5, "dv")
    assert np.all(np.asarray(dk[:, 16:]) == 0) and np.all(np.asarray(dv[:, 16:]) == 0)


def test_key_blocks_past_kv_lengths_are_never_read():
    # Chunks of 8 queries at the end of caches 20 and 5 keys long, in 48-key buffers read in
    # blocks of 16. Hidden keys inside a visible block are read and masked, so garbage there must
    # not leak; the blocks wholly past a length hold NaN, which would poison the output and the
    # gradients if such a tile were ever computed.
    q, k, v, do = _inputs(8, 48, 2, 1, 64, jnp.float32, seed=6, batch=2)
    mask = {"causal": True, "q_offset": jnp.array([12, -3]), "kv_lengths": jnp.array([20, 5])}
    pos = jnp.arange(48)[None, :, None, None]
    hidden = pos >= jnp.array([20, 5])[:, None, None, None]
    unread = pos >= jnp.array([32, 16])[:, None, None, None]

    def poison(x):
        return jnp.where(unread, jnp.nan, jnp.where(hidden, 1e3, x))

    def attend(impl, blocks=None):
        return lambda q, k, v: flash_attention(q, k, v, implementation=impl, blocks=blocks, **mask)

    out, vjp = jax.vjp(attend("pallas_tpu", TINY), q, poison(k), poison(v))
    want, want_vjp = jax.vjp(attend("xla"), q, k, v)
    _close(out, want, 2e-5, "output")
    dq, dk, dv = vjp(do)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), want_vjp(do)):
        _close(got, want, 2e-5, name)
    assert not np.asarray(jnp.where(hidden, dk, 0)).any()
    assert not np.asarray(jnp.where(hidden, dv, 0)).any()


# --- which tiles run, which blocks are fetched ----------------------------------------------------

MASKS = [(c, w) for c in (False, True) for w in (None, 1, 2, 5, 10, 16, 37)]
# (q_offset, kv_len) of a row: neither; lengths cutting a tile, inside one, hiding every key;
# queries moved forward, backward and past every key; both.
ROWS = [(None, None), (None, 23), (None, 4), (None, 0), (13, None), (-6, None), (100, None), (29, 30), (3, 9)]


def _brute_force_tiles(seq_q, seq_k, block_q, block_k, causal, window, q_offset=None, kv_len=None):
    """Tile (i, j) holds a visible entry, by `visible` over every position of the padded tile,
    queries shifted by ``q_offset``."""
    nq, nk = -(-seq_q // block_q), -(-seq_k // block_k)
    qp = np.arange(nq * block_q)[:, None] + (q_offset or 0)
    kp = np.arange(nk * block_k)[None, :]
    ok = np.asarray(visible(jnp.asarray(qp), jnp.asarray(kp), causal=causal, window=window, kv_len=kv_len))
    return np.asarray(ok.reshape(nq, block_q, nk, block_k).any(axis=(1, 3)))


# Odd block sizes too: the functions are plain arithmetic, and they put tile edges everywhere.
BLOCK_CASES = [(3, 5, 40, 40), (8, 8, 40, 40), (16, 8, 64, 40), (5, 16, 24, 72)]


@pytest.mark.parametrize("block_q, block_k, seq_q, seq_k", BLOCK_CASES)
def test_block_visible_is_exact_for_masks_query_offsets_and_kv_lengths(block_q, block_k, seq_q, seq_k):
    for (causal, window), (q_offset, kv_len) in itertools.product(MASKS, ROWS):
        want = _brute_force_tiles(seq_q, seq_k, block_q, block_k, causal, window, q_offset, kv_len)
        qb, kb = np.meshgrid(np.arange(want.shape[0]), np.arange(want.shape[1]), indexing="ij")
        got = np.broadcast_to(
            attention_tpu.block_visible(
                qb, kb, block_q=block_q, block_k=block_k, causal=causal, window=window, q_offset=q_offset, kv_len=kv_len
            ),
            want.shape,
        )
        np.testing.assert_array_equal(got, want, err_msg=f"{causal=} {window=} {q_offset=} {kv_len=}")


def _fetch_runs(indices):
    return [i for i, _ in itertools.groupby(int(x) for x in indices)]


def _assert_fetches_each_visible_block_once(fetched, tiles, what):
    """Row i of ``fetched`` (the block fetched at each step of block i) fetches every block that
    row i of ``tiles`` marks visible at that block's own step, each once, and no other block; a
    block that sees nothing fetches a single one (the pipeline always fetches a first block)."""
    for i, (steps, row) in enumerate(zip(fetched, tiles)):
        seen = list(np.flatnonzero(row))
        assert all(steps[j] == j for j in seen), (what, i)
        runs = _fetch_runs(steps)
        assert runs == seen if seen else len(runs) == 1, (what, i, runs)


@pytest.mark.parametrize("block_q, block_k, seq_q, seq_k", BLOCK_CASES)
def test_index_maps_fetch_each_visible_block_once_and_nothing_else(block_q, block_k, seq_q, seq_k):
    nq, nk = -(-seq_q // block_q), -(-seq_k // block_k)
    qb, kb = np.arange(nq), np.arange(nk)
    for (causal, window), (q_offset, kv_len) in itertools.product(MASKS, ROWS):
        tiles = _brute_force_tiles(seq_q, seq_k, block_q, block_k, causal, window, q_offset, kv_len)
        mask = {
            "block_q": block_q,
            "block_k": block_k,
            "causal": causal,
            "window": window,
            "q_offset": q_offset,
            "kv_len": kv_len,
        }
        what = f"{causal=} {window=} {q_offset=} {kv_len=}"
        # forward and dQ: the key block fetched at step j of query block i
        fetched = attention_tpu.kv_block_index(qb[:, None], kb[None, :], num_k_blocks=nk, **mask)
        _assert_fetches_each_visible_block_once(np.broadcast_to(fetched, (nq, nk)), tiles, what)
        # dK/dV: the query block fetched at step i of key block j
        fetched = attention_tpu.q_block_index(kb[:, None], qb[None, :], num_q_blocks=nq, **mask)
        _assert_fetches_each_visible_block_once(np.broadcast_to(fetched, (nk, nq)), tiles.T, what)


def test_without_causal_or_window_every_tile_runs():
    assert attention_tpu.block_visible(3, 0, block_q=8, block_k=8, causal=False, window=None) is True


# --- what the backend accepts ---------------------------------------------------------------------

ARGS = {
    "head_dim": 64,
    "seq_q": 40,
    "seq_k": 40,
    "heads": 8,
    "kv_heads": 2,
    "causal": True,
    "segments": True,
    "window": 8,
}


def test_check_accepts_query_offsets_and_kv_lengths():
    assert attention_tpu.check(dtype=jnp.bfloat16, offsets=True, lengths=True, **ARGS) is None


def test_check_rejects_float16_and_names_bfloat16():
    why = attention_tpu.check(dtype=jnp.float16, **ARGS)
    assert why is not None and "float16" in why and "bfloat16" in why


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_check_accepts_fp32_bf16_at_any_head_dim(dtype, head_dim):
    assert attention_tpu.check(dtype=dtype, **{**ARGS, "head_dim": head_dim}) is None


def test_float16_through_flash_attention_raises_with_the_reason():
    q = jnp.zeros((1, 8, 2, 64), jnp.float16)
    with pytest.raises(KernelUnavailable, match="bfloat16"):
        flash_attention(q, q, q, implementation="pallas_tpu")


def test_blocks_must_be_lane_multiples_on_tpu():
    q, k, v, _ = _inputs(40, 40, 2, 2, 64, jnp.float32)
    opts = AttentionOptions(causal=False, sm_scale=0.125, blocks=AttentionBlocks(block_q=64), interpret=False)
    with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
        attention_tpu.forward(q, k, v, None, None, None, None, opts)


def test_blocks_must_be_sublane_multiples_in_the_interpreter():
    q, k, v, _ = _inputs(40, 40, 2, 2, 64, jnp.float32)
    opts = AttentionOptions(causal=False, sm_scale=0.125, blocks=AttentionBlocks(block_k=20), interpret=True)
    with pytest.raises(ValueError, match="block_k=20 must be a multiple of 8"):
        attention_tpu.forward(q, k, v, None, None, None, None, opts)


@pytest.mark.parametrize(
    "causal, window, segments, offsets, lengths",
    [
        (True, None, True, False, False),
        (False, 100, False, False, False),
        (True, 200, True, True, True),
        (False, None, False, False, True),
    ],
)
def test_kernels_lower_to_mosaic_for_tpu(causal, window, segments, offsets, lengths):
    # Lowering (not compiling) for TPU works without one: it checks block shapes and that every
    # operation in the three kernels, index maps reading prefetched offsets and lengths too, has a
    # Mosaic lowering, at TPU-sized blocks.
    from mlsys_jax.kernels.attention import pallas_vjp

    attend = pallas_vjp(attention_tpu.forward, attention_tpu.backward)
    opts = AttentionOptions(
        causal=causal, sm_scale=0.125, window=window, blocks=AttentionBlocks(128, 128, 128, 128), interpret=False
    )
    q = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 260, 2, 64), jnp.bfloat16)
    q_seg = jax.ShapeDtypeStruct((2, 300), jnp.int32) if segments else None
    kv_seg = jax.ShapeDtypeStruct((2, 260), jnp.int32) if segments else None
    q_offset = jax.ShapeDtypeStruct((2,), jnp.int32) if offsets else None
    kv_lengths = jax.ShapeDtypeStruct((2,), jnp.int32) if lengths else None

    def loss(q, k, v, *segs_and_rows):
        return jnp.sum(attend(q, k, v, *segs_and_rows, opts).astype(jnp.float32))

    try:
        lowered = (
            jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            .trace(q, kv, kv, q_seg, kv_seg, q_offset, kv_lengths)
            .lower(lowering_platforms=("tpu",))
        )
    except ValueError as err:
        if "Unsupported TPU device kind" in str(err):
            pytest.skip(f"this jax needs a real TPU to lower: {err}")
        raise
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dK/dV, dQ


def test_registered_for_tpu_and_interpretable():
    from mlsys_jax.kernels.attention import FLASH_ATTENTION

    backend = FLASH_ATTENTION.backends["pallas_tpu"]
    assert backend.platforms == ("tpu",) and backend.interpretable
