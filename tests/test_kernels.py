"""The kernels' shared machinery: the attention reference as specification, dispatch with reasons,
block-size configs, and the autotune cache."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.kernels import (
    FLASH_ATTENTION,
    LAYER_NORM,
    LINEAR_CROSS_ENTROPY,
    RMS_NORM,
    AttentionBlocks,
    KernelUnavailable,
    LossBlocks,
    NormBlocks,
    default_blocks,
    flash_attention,
)
from mlsys_jax.kernels.attention import choose
from mlsys_jax.kernels.autotune import autotune, cache_key, cached_blocks, shape_class
from mlsys_jax.kernels.dispatch import Backend, Registry


def textbook(q, k, v, mask):
    """Attention with K/V repeated per query head and an explicit (seq_q, seq_k) mask."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def qkv(b=2, s=12, h=4, kv=2, d=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(keys[0], (b, s, h, d)),
        jax.random.normal(keys[1], (b, s, kv, d)),
        jax.random.normal(keys[2], (b, s, kv, d)),
    )


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 3), (False, 3)])
def test_reference_attention_is_masked_softmax_attention(causal, window):
    q, k, v = qkv()
    i, j = np.arange(12)[:, None], np.arange(12)[None, :]
    mask = np.ones((12, 12), bool)
    if causal:
        mask &= j <= i
    if window:
        mask &= np.abs(i - j) < window if not causal else (i - j) < window
    got = flash_attention(q, k, v, causal=causal, sliding_window=window, implementation="xla")
    np.testing.assert_allclose(got, textbook(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_segment_ids_keep_documents_apart_and_an_unseen_query_gets_zeros():
    q, k, v = qkv(b=1)
    q_seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    kv_seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3]])  # query document 2 has no keys
    got = flash_attention(q, k, v, segment_ids=(q_seg, kv_seg), implementation="xla")
    mask = q_seg[0][:, None] == kv_seg[0][None, :]
    np.testing.assert_allclose(got, textbook(q, k, v, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 7:], 0.0)
    grads = jax.grad(lambda q: flash_attention(q, k, v, segment_ids=(q_seg, kv_seg), implementation="xla").sum())(q)
    assert np.isfinite(grads).all() and not grads[:, 7:].any()


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, 4), (False, None)])
def test_query_offsets_and_key_lengths_mask_where_each_query_really_is(causal, window):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (3, 5, 4, 8))  # a chunk of 5 queries per row
    k = jax.random.normal(keys[1], (3, 12, 2, 8))  # against 12 cached keys
    v = jax.random.normal(keys[2], (3, 12, 2, 8))
    offsets, lengths = np.array([7, 0, 3]), np.array([12, 5, 2])
    got = flash_attention(
        q,
        k,
        v,
        causal=causal,
        sliding_window=window,
        q_offset=jnp.array(offsets),
        kv_lengths=jnp.array(lengths),
        implementation="xla",
    )
    for b in range(3):
        i = offsets[b] + np.arange(5)[:, None]  # where each query really is
        j = np.arange(12)[None, :]
        mask = np.broadcast_to(j < lengths[b], (5, 12)).copy()
        if causal:
            mask &= j <= i
        if window:
            mask &= (i - j < window) & ((j - i < window) | causal)
        np.testing.assert_allclose(
            got[b : b + 1], textbook(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask), rtol=1e-5, atol=1e-5
        )
    grads = jax.grad(
        lambda q, k: flash_attention(
            q,
            k,
            v,
            causal=causal,
            sliding_window=window,
            q_offset=jnp.array(offsets),
            kv_lengths=jnp.array(lengths),
            implementation="xla",
        ).sum(),
        argnums=(0, 1),
    )(q, k)
    assert all(np.isfinite(g).all() for g in grads)
    assert not grads[1][2, 2:].any()  # keys past a row's length get no gradient


def test_a_chunk_at_its_offset_sees_what_its_rows_of_the_whole_sequence_see():
    q, k, v = qkv(b=2, s=12)
    whole = flash_attention(q, k, v, causal=True, implementation="xla")
    chunk = flash_attention(q[:, 8:], k, v, causal=True, q_offset=8, implementation="xla")
    np.testing.assert_allclose(chunk, whole[:, 8:], rtol=1e-6, atol=1e-6)
    # One decoded token against a cache whose tail is not written yet.
    garbage = k.at[:, 10:].set(1e3)
    token = flash_attention(
        q[:, 9:10],
        garbage,
        v,
        causal=True,
        q_offset=jnp.array([9, 9]),
        kv_lengths=jnp.array([10, 10]),
        implementation="xla",
    )
    np.testing.assert_allclose(token, whole[:, 9:10], rtol=1e-6, atol=1e-6)


def test_offsets_and_lengths_need_one_int_per_row():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q_offset must be an int or one int per batch row, shape \(2,\)"):
        flash_attention(q, k, v, q_offset=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="kv_lengths must be"):
        flash_attention(q, k, v, kv_lengths=jnp.zeros((2,), jnp.float32))


def test_cudnn_is_passed_over_for_query_offsets_with_its_reason():
    pick = FLASH_ATTENTION.choose(
        None,
        platform="gpu",
        dtype=jnp.bfloat16,
        head_dim=64,
        seq_q=1,
        seq_k=128,
        heads=4,
        kv_heads=2,
        causal=True,
        segments=False,
        window=None,
        offsets=True,
        lengths=True,
    )
    assert "query offsets" in dict(pick.passed_over)["cudnn"]


def test_automatic_choice_on_cpu_is_the_reference_and_says_so():
    q, k, _ = qkv()
    assert choose(q, k, causal=True).backend.name == "xla"


def test_naming_a_backend_that_cannot_run_here_raises_its_reason():
    q, k, v = qkv()
    with pytest.raises(KernelUnavailable, match="cudnn.*runs on gpu, not cpu"):
        flash_attention(q, k, v, implementation="cudnn")
    with pytest.raises(KernelUnavailable, match="unknown implementation 'flash'.*xla"):
        flash_attention(q, k, v, implementation="flash")


def test_cudnn_is_passed_over_with_a_reason_for_what_it_cannot_serve():
    q, k, _ = qkv()
    choice = choose(q, k, segment_ids=jnp.zeros(q.shape[:2], jnp.int32))
    assert choice.backend.name == "xla"
    gpu = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    pick = FLASH_ATTENTION.choose(
        None,
        platform="gpu",
        dtype=gpu.dtype,
        head_dim=8,
        seq_q=12,
        seq_k=12,
        heads=4,
        kv_heads=2,
        causal=True,
        segments=False,
        window=None,
    )
    reasons = dict(pick.passed_over)
    assert "bf16 or fp16" in reasons["cudnn"]
    assert "cudnn" in pick.describe()


def test_dispatch_falls_through_in_platform_order_and_lists_every_reason():
    reg = Registry("toy", {"gpu": ("fast", "ok", "ref"), "cpu": ("ref",)})
    reg.register(Backend("fast", ("gpu",), lambda x: "fast", lambda *, n, **_: "n too big" if n > 4 else None))
    reg.register(Backend("ok", ("gpu",), lambda x: "ok", lambda *, n, **_: "n odd" if n % 2 else None))
    reg.register(Backend("ref", ("cpu", "gpu"), lambda x: "ref"))
    assert reg.choose(None, platform="gpu", n=2)(0) == "fast"
    pick = reg.choose(None, platform="gpu", n=6)
    assert pick(0) == "ok" and pick.passed_over == (("fast", "n too big"),)
    pick = reg.choose(None, platform="gpu", n=7)
    assert pick(0) == "ref" and [n for n, _ in pick.passed_over] == ["fast", "ok"]
    with pytest.raises(KernelUnavailable, match="n too big"):
        reg.choose("fast", platform="gpu", n=9)


def test_pallas_means_interpreted_kernels_on_cpu_and_native_ones_elsewhere():
    reg = Registry("toy", {"gpu": ("pallas_a", "ref"), "cpu": ("ref",)})
    reg.register(Backend("pallas_a", ("gpu",), lambda x, interpret: interpret, interpretable=True))
    reg.register(Backend("ref", ("cpu", "gpu"), lambda x: None))
    assert reg.choose("pallas", platform="cpu")(0) is True
    assert reg.choose("pallas", platform="gpu")(0) is False
    assert reg.choose(None, platform="cpu").backend.name == "ref"
    assert reg.choose("pallas_a", platform="cpu").interpret


@pytest.mark.parametrize(
    "change,match",
    [
        ({"k": jnp.zeros((2, 12, 3, 8)), "v": jnp.zeros((2, 12, 3, 8))}, "kv_heads=3 must divide heads=4"),
        ({"k": jnp.zeros((2, 12, 2, 8), jnp.bfloat16), "v": jnp.zeros((2, 12, 2, 8), jnp.bfloat16)}, "share one dtype"),
        ({"segment_ids": jnp.zeros((2, 5), jnp.int32)}, r"segment ids must be \(batch, seq\)"),
        ({"sliding_window": 0}, "sliding_window must be a positive int"),
        ({"q": jnp.zeros((12, 4, 8))}, r"q must be \(batch, seq, heads, head_dim\)"),
    ],
)
def test_bad_attention_inputs_get_one_clear_error(change, match):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v} | change
    with pytest.raises(ValueError, match=match):
        flash_attention(**args)


def test_block_configs_refuse_nonsense_and_default_per_device_kind():
    with pytest.raises(ValueError, match="AttentionBlocks.block_q must be a positive int"):
        AttentionBlocks(block_q=0)
    # Each backend keeps its own defaults beside its kernels.
    assert default_blocks(FLASH_ATTENTION, "pallas_triton", "NVIDIA H200").num_warps == 8
    assert default_blocks(FLASH_ATTENTION, "pallas_tpu", "TPU v5p").block_q == 512
    assert default_blocks(RMS_NORM, "pallas_triton", "some new chip") == NormBlocks()
    assert default_blocks(LINEAR_CROSS_ENTROPY, "chunked", "some new chip") == LossBlocks(1024, 2048)
    assert default_blocks(FLASH_ATTENTION, "xla", "cpu") is None  # the reference has no tiles


def test_backend_tables_are_explicit_and_their_orders_name_only_their_backends():
    for registry in (FLASH_ATTENTION, RMS_NORM, LAYER_NORM, LINEAR_CROSS_ENTROPY):
        for names in registry.order.values():
            assert set(names) <= set(registry.names()), registry.op
    with pytest.raises(ValueError, match=r"the gpu order names \['pallas_mosaic_gpu'\]"):
        Registry("toy", {"gpu": ("ref", "pallas_mosaic_gpu")}, backends=[Backend("ref", ("gpu",), lambda x: x)])


def test_autotune_times_candidates_caches_the_winner_and_kernels_read_it(tmp_path):
    path = tmp_path / "tune.json"
    x = jnp.zeros((3, 100))
    cost = {16: 3, 32: 1, 64: 2}

    def run(blocks):
        if blocks.block_rows == 64:
            raise ValueError("cannot lower")
        return lambda: jnp.zeros((cost[blocks.block_rows] * 100_000,)).sum()

    candidates = [NormBlocks(block_rows=r) for r in (16, 32, 64)]
    best, trials = autotune("rms_norm", "toy", run, candidates, x, repeats=2, path=path)
    assert best in candidates[:2]
    assert [t.error is not None for t in trials] == [False, False, True]
    assert cached_blocks("rms_norm", "toy", NormBlocks, x, path=path) == best
    assert cached_blocks("rms_norm", "toy", NormBlocks, jnp.zeros((3, 100, 2)), path=path) is None
    entry = json.loads(path.read_text())[cache_key("rms_norm", "toy", x)]
    assert entry["tried"] == 3 and jax.devices()[0].device_kind in cache_key("rms_norm", "toy", x)


def test_shape_classes_round_up_to_powers_of_two():
    assert shape_class(jnp.zeros((3, 100)), jnp.zeros((1, 128))) == "4x128,1x128"


def test_a_damaged_autotune_cache_is_reported_and_ignored(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cached_blocks("rms_norm", "toy", NormBlocks, jnp.zeros((2, 2)), path=path) is None
    assert any("delete it and tune again" in str(w.message) for w in seen)


def test_tuning_a_kernel_caches_a_config_its_plain_calls_then_use(tmp_path, monkeypatch):
    from mlsys_jax.kernels import norms, tuning
    from mlsys_jax.kernels.autotune import CACHE_ENV, resolve_blocks

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "tune.json"))
    x = jax.random.normal(jax.random.key(0), (24, 128))
    w = jnp.ones((128,))
    candidates = [NormBlocks(block_rows=8), NormBlocks(block_rows=16)]
    best, trials = tuning.tune_rms_norm(x, w, implementation="pallas_triton", candidates=candidates)
    assert best in candidates and all(t.seconds is not None for t in trials)
    assert resolve_blocks("rms_norm", RMS_NORM.backends["pallas_triton"], x) == best
    np.testing.assert_allclose(
        norms.rms_norm(x, w, implementation="pallas_triton"),
        norms.rms_norm(x, w, implementation="xla"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_every_tiled_backend_has_tuning_candidates_that_are_valid_configs():
    from mlsys_jax.kernels import tuning

    for registry in (FLASH_ATTENTION, RMS_NORM, LAYER_NORM, LINEAR_CROSS_ENTROPY):
        for backend in registry.backends.values():
            if backend.blocks is None:
                continue
            for platform in (*backend.platforms, "cpu"):
                found = tuning.candidates_of(backend, platform)
                assert len(set(found)) >= 2, (registry.op, backend.name, platform)
                assert all(isinstance(c, backend.blocks) for c in found)
