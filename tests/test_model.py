"""The Llama-family model: the equations of its parts, causality, GQA, remat, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.kernels import flash_attention, rms_norm
from mlsys_jax.kernels.cross_entropy import logits as logits_projection
from mlsys_jax.models import CONFIGS, ConfigError, get_config, llama
from mlsys_jax.models.layers import apply_rope, rope_angles
from mlsys_jax.params import count_params, init_params

CFG = get_config("tiny", dtype="float32")


@pytest.fixture(scope="module")
def params():
    return init_params(llama.param_specs(CFG), jax.random.key(0))


def tokens(batch=2, seq=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, CFG.vocab_size)


def test_forward_gives_fp32_logits_over_the_vocabulary(params):
    logits = jax.jit(lambda p, t: llama.forward(p, t, CFG))(params, tokens())
    assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bf16_compute_stays_close_to_fp32(params):
    t = tokens()
    full = llama.forward(params, t, CFG)
    half = llama.forward(params, t, CFG.replace(dtype="bfloat16"))
    assert half.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(full - half))) < 0.1 * float(jnp.max(jnp.abs(full)))


def test_future_tokens_do_not_change_past_logits(params):
    t = tokens()
    changed = t.at[:, 10:].set((t[:, 10:] + 1) % CFG.vocab_size)
    a, b = llama.forward(params, t, CFG), llama.forward(params, changed, CFG)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def reference_attention(q, k, v):
    """Textbook attention with K/V heads repeated to match the query heads."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = np.tril(np.ones((q.shape[1], k.shape[1]), bool))
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 4), (8, 2), (8, 1)])
def test_grouped_query_attention_matches_repeated_kv(heads, kv_heads):
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 12, heads, 16))
    k = jax.random.normal(kk, (2, 12, kv_heads, 16))
    v = jax.random.normal(kv, (2, 12, kv_heads, 16))
    got = flash_attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_allclose(got, reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_rms_norm_equation():
    x = jax.random.normal(jax.random.key(2), (3, 8)) * 5
    w = jnp.arange(1.0, 9.0)
    expected = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(x, w, eps=1e-5, implementation="xla"), expected, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(4), (1, 1, 1, 16))
    cos, sin = rope_angles(jnp.arange(40), 16, 10_000.0)

    def score(m, n):
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return float(jnp.sum(qm * kn))

    assert score(7, 3) == pytest.approx(score(30, 26), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)  # position 0 is no rotation


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_give_the_same_gradients(params, policy):
    t = tokens()

    def loss(p, cfg):
        return jnp.mean(jax.nn.logsumexp(llama.forward(p, t, cfg), -1))

    base = jax.grad(loss)(params, CFG)
    other = jax.grad(loss)(params, CFG.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layers_run_as_one_scan_whatever_the_depth():
    for depth in (2, 12):
        cfg = CFG.replace(n_layers=depth)
        p = jax.eval_shape(lambda c=cfg: init_params(llama.param_specs(c), jax.random.key(0)))
        jaxpr = jax.make_jaxpr(lambda p, t, c=cfg: llama.forward(p, t, c))(p, tokens())
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1 and scans[0].params["length"] == depth


def test_tied_embeddings_share_the_table():
    cfg = CFG.replace(tie_embeddings=True)
    specs = llama.param_specs(cfg)
    assert "head" not in specs
    p = init_params(specs, jax.random.key(0))
    logits = llama.forward(p, tokens(), cfg)
    assert logits.shape[-1] == cfg.vocab_size and bool(jnp.all(jnp.isfinite(logits)))
    assert count_params(specs) == count_params(llama.param_specs(CFG)) - cfg.d_model * cfg.vocab_size


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=8"):
        get_config("tiny", n_kv_heads=3)


def test_cudnn_attention_refuses_a_cpu_with_a_fix():
    from mlsys_jax.kernels import KernelUnavailable

    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(KernelUnavailable, match="cudnn.*runs on gpu, not cpu"):
        flash_attention(q, q, q, causal=True, implementation="cudnn")


@pytest.mark.parametrize("name, billions", [("1b", 1.24), ("7b", 6.74), ("8b", 8.03), ("70b", 70.55)])
def test_planning_presets_have_their_published_sizes(name, billions):
    assert count_params(llama.param_specs(CONFIGS[name])) / 1e9 == pytest.approx(billions, rel=0.01)


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = CONFIGS["7b"]
    n = llama.matmul_params(cfg)
    assert llama.flops_per_token(cfg, 2048) == 6 * n + 12 * 32 * 32 * 128 * 2048
    # Everything but the input embedding and the norms does a matmul per token.
    norms = cfg.n_layers * 2 * cfg.d_model + cfg.d_model
    assert n == count_params(llama.param_specs(cfg)) - cfg.vocab_size * cfg.d_model - norms


@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2), (4, 1)])
def test_fused_qkv_projection_is_three_projections(heads, kv_heads):
    from mlsys_jax.models.layers import qkv_projection

    kx, kq, kk, kv = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(kx, (2, 5, 32))
    wq = jax.random.normal(kq, (32, heads, 16))
    wk = jax.random.normal(kk, (32, kv_heads, 16))
    wv = jax.random.normal(kv, (32, kv_heads, 16))
    q, k, v = qkv_projection(x, wq, wk, wv)
    for got, w in ((q, wq), (k, wk), (v, wv)):
        np.testing.assert_allclose(got, jnp.einsum("bsd,dhk->bshk", x, w), rtol=1e-5, atol=1e-5)


def test_swiglu_equation():
    from mlsys_jax.models.layers import swiglu

    kx, kg, ku, kd = jax.random.split(jax.random.key(6), 4)
    x = jax.random.normal(kx, (2, 3, 16))
    wg, wu, wd = (jax.random.normal(k, s) for k, s in ((kg, (16, 24)), (ku, (16, 24)), (kd, (24, 16))))
    expected = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
    np.testing.assert_allclose(swiglu(x, wg, wu, wd), expected, rtol=1e-4, atol=1e-4)


def test_logits_are_fp32_and_their_gradients_take_the_compute_dtype():
    x = jax.random.normal(jax.random.key(7), (2, 3, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(8), (16, 40)).astype(jnp.bfloat16)
    out = logits_projection(x, w)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, jnp.einsum("bsd,dv->bsv", x.astype(jnp.float32), w.astype(jnp.float32)), rtol=1e-2)
    loss = lambda x, w: jnp.sum(jnp.sin(logits_projection(x, w)))
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(gw.astype(jnp.float32), ref[1], rtol=5e-2, atol=5e-2)
    # In fp32 the projection is an ordinary matmul, gradients included.
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    for a, b in zip(jax.grad(loss, argnums=(0, 1))(x32, w32), ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_embedding_gradient_adds_rows_up_in_fp32():
    from mlsys_jax.models.layers import embedding_lookup

    table = jax.random.normal(jax.random.key(9), (16, 4))
    tokens = jnp.array([[3, 3, 3, 7], [3, 0, 7, 3]])
    g = jax.random.normal(jax.random.key(10), (2, 4, 4))
    np.testing.assert_array_equal(embedding_lookup(table, tokens), table[tokens])
    ours = jax.vjp(lambda t: embedding_lookup(t, tokens), table)[1](g)[0]
    ref = jax.vjp(lambda t: t[tokens], table)[1](g)[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # 4096 gradients of 0.001 land on one row: fp32 accumulation keeps their sum, bf16 would stall.
    many = jnp.zeros((1, 4096), jnp.int32)
    ones_ = jnp.full((1, 4096, 4), 1e-3, jnp.bfloat16)
    grad = jax.vjp(lambda t: embedding_lookup(t, many), table.astype(jnp.bfloat16))[1](ones_)[0]
    assert grad.dtype == jnp.bfloat16
    assert float(grad[0, 0]) == pytest.approx(4.096, rel=1e-2)
