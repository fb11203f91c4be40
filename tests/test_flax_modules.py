"""A Flax module whose variables name logical axes trains, plans and checkpoints as a
``LanguageModel``: the NNX Llama (and its Linen block through the bridge), started from our pure
Llama's weights, gives the same losses under fsdp_tp on 8 devices; missing or unknown axes are
named by the variable's path; ``mlsys-jax plan`` finds it as a plugin family."""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from flax_llama import FlaxLlama, FlaxLlamaConfig, params_from_llama
from jax.sharding import PartitionSpec as P
from test_families import plan_command
from token_batches import random_batches

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.models import ConfigError, base, get_config, llama
from mlsys_jax.models.flax_modules import from_nnx
from mlsys_jax.params import specs_key
from mlsys_jax.train.checkpoint import Checkpointer

CFG = get_config("tiny", dtype="float32")
FLAX_CFG = FlaxLlamaConfig.like(CFG)
OPT_CFG = train.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10)
PLUGIN = "tests/plugins/flax_family.py"


def adapted(blocks: str = "nnx"):
    return from_nnx(functools.partial(FlaxLlama, FLAX_CFG, blocks=blocks), name="nnx_llama", compute_dtype="float32")


def batches(n=3, batch=8, seq=16):
    out = random_batches(CFG.vocab_size, n, batch, seq)
    for b in out:
        b["mask"][0, :3] = False  # some tokens do not count
    return out


def train_three_steps(model, plan, params=None):
    """Losses and final state of 3 steps from ``params`` (default: the model's own init)."""
    opt = train.adamw(OPT_CFG, model.specs)
    state = train.init_state(plan, model.specs, opt, seed=0)
    initial = jax.device_get(state.params)
    if params is not None:
        state = state._replace(params=jax.device_put(params, plan.param_shardings(model.specs)))
    step = train.make_train_step(model, plan, opt, lr_schedule=train.schedule(OPT_CFG))
    losses = []
    for b in batches():
        state, metrics = step(state, {k: jax.device_put(v, step.batch_shardings[k]) for k, v in b.items()})
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, initial


@pytest.fixture(scope="module")
def plan(devices):
    return mj.Plan(mj.make_mesh(fsdp=4, tensor=2), mj.rules("fsdp_tp"))


@pytest.fixture(scope="module")
def pure_run(plan):
    losses, state, initial = train_three_steps(llama.language_model(CFG), plan)
    return losses, jax.device_get(state.params), initial


@pytest.fixture(scope="module")
def nnx_run(plan, pure_run):
    model = adapted()
    losses, state, own_init = train_three_steps(model, plan, params_from_llama(pure_run[2]))
    return model, losses, state, own_init


def test_the_nnx_llama_trains_like_our_llama_under_fsdp_tp(pure_run, nnx_run):
    want_losses, want_params, _ = pure_run
    _, losses, state, _ = nnx_run
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    chex.assert_trees_all_close(jax.device_get(state.params), params_from_llama(want_params), rtol=1e-4, atol=1e-6)


def test_a_linen_block_through_the_bridge_trains_the_same(plan, pure_run):
    model = adapted("linen")
    assert specs_key(model.specs) == specs_key(adapted().specs)  # same paths, shapes, dtypes and axes
    losses, _, _ = train_three_steps(model, plan, params_from_llama(pure_run[2]))
    np.testing.assert_allclose(losses, pure_run[0], rtol=1e-5)


def test_specs_carry_the_metadatas_axes_and_the_plan_places_them(plan, nnx_run):
    model, _, state, own_init = nnx_run
    wq = model.specs["layers"]["wq"]["kernel"]
    assert wq.shape == (2, 64, 8, 16) and wq.logical_axes == ("layers", "embed", "heads", "head_dim")
    assert model.specs["tok_embed"]["embedding"].logical_axes == ("vocab", "embed")
    specs = {p.path: p.spec for p in plan.placements(model.specs)}
    assert specs["layers/wq/kernel"] == P(None, "fsdp", "tensor")
    assert specs["lm_head/kernel"] == P("fsdp", "tensor")
    got = state.params["layers"]["wq"]["kernel"]
    assert got.sharding.is_equivalent_to(plan.sharding(P(None, "fsdp", "tensor")), got.ndim)
    assert (model.num_layers, model.vocab_size) == (2, 384)
    assert model.flops_per_token(16) == 6 * llama.matmul_params(CFG)  # attention scores not counted
    # Its own initialization runs each variable's Flax initializer, layer by layer.
    np.testing.assert_array_equal(own_init["final_norm"]["scale"], np.ones(64, np.float32))
    kernels = own_init["layers"]["w_up"]["kernel"]
    assert not np.allclose(kernels[0], kernels[1]) and 0.1 < kernels.std() < 0.15  # fan-in 64


def test_blocks_built_stacked_with_nnx_vmap_are_the_same_model(nnx_run):
    stacked, listed = adapted("vmap"), nnx_run[0]
    assert specs_key(stacked.specs) == specs_key(listed.specs)
    params = jax.tree.map(np.asarray, nnx_run[3])
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    logits = [jax.jit(functools.partial(base.forward, m))(params, tokens) for m in (stacked, listed)]
    np.testing.assert_array_equal(*logits)


# --- what an adapted module must carry ---------------------------------------------------------


class Mlp(nnx.Module):
    def __init__(self, axes, rngs):
        init = nnx.initializers.lecun_normal()
        self.w_up = nnx.Linear(
            8, 16, use_bias=False, rngs=rngs, kernel_init=init if axes is None else nnx.with_partitioning(init, axes)
        )
        self.w_down = nnx.Linear(
            16, 8, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("mlp", "embed"))
        )

    def __call__(self, x, positions):
        return x + self.w_down(self.w_up(x))


class Tiny(nnx.Module):
    """A small model whose blocks' ``w_up`` names the given axes (None: no metadata)."""

    def __init__(self, rngs, axes=("embed", "mlp"), block_rngs=False):
        part = nnx.with_partitioning
        self.table = nnx.Embed(32, 8, embedding_init=part(nnx.initializers.normal(), ("vocab", "embed")), rngs=rngs)
        self.layers = nnx.List([Block(axes, rngs, block_rngs) for _ in range(2)])
        self.out = nnx.Linear(
            8, 32, use_bias=False, kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "vocab")), rngs=rngs
        )

    def embed(self, tokens, positions):
        return self.table(tokens)

    def head(self, x):
        return self.out(x)


class Block(nnx.Module):
    def __init__(self, axes, rngs, keep_rngs):
        self.mlp = Mlp(axes, rngs)
        self.rngs = rngs.fork() if keep_rngs else None

    def __call__(self, x, positions):
        return self.mlp(x, positions)


def test_a_variable_without_logical_axes_is_named_with_the_fix():
    with pytest.raises(
        ConfigError, match=r"variable 'layers/0/mlp/w_up/kernel' has no logical axes.*nnx.with_partitioning"
    ):
        from_nnx(functools.partial(Tiny, axes=None))


def test_an_axis_no_rule_knows_is_named_by_the_plan(plan):
    model = from_nnx(functools.partial(Tiny, axes=("embed", "mlpp")))
    with pytest.raises(
        mj.PlanError,
        match=r"parameter 'layers/mlp/w_up/kernel' of shape \(2, 8, 16\) names logical axis 'mlpp'.*Did you mean 'mlp'",
    ):
        plan.placements(model.specs)


def test_state_that_is_not_parameters_missing_blocks_and_decoding_are_refused():
    with pytest.raises(ConfigError, match=r"'layers/0/rngs/default/count' is an nnx.RngCount, not an nnx.Param"):
        from_nnx(functools.partial(Tiny, block_rngs=True))
    with pytest.raises(ConfigError, match="KV cache is not supported for adapted Flax modules"):
        from_nnx(Tiny).cache_specs(1, 8)
    with pytest.raises(ConfigError, match=r"Tiny.blocks should hold the per-layer blocks.*it is NoneType"):
        from_nnx(Tiny, layers="blocks")


def test_a_checkpoint_of_the_adapted_models_state_restores_equal(tmp_path, plan, nnx_run):
    model, _, state, _ = nnx_run
    ckpt = Checkpointer(tmp_path, save_every=1)
    assert ckpt.save(3, state, {"next_index": 3}, {})
    ckpt.wait()
    opt = train.adamw(OPT_CFG, model.specs)
    restored = Checkpointer(tmp_path).restore(train.abstract_state(plan, model.specs, opt))
    assert restored.step == 3
    chex.assert_trees_all_equal(jax.device_get(restored.state), jax.device_get(state))
    ckpt.close()


@pytest.mark.slow
def test_mlsys_jax_plan_shows_a_flax_family_from_the_plugins_variable(repo_root):
    run = plan_command(
        repo_root,
        "--model",
        "nnx_llama:tiny",
        "--mesh",
        "data=2,fsdp=2,tensor=2",
        MLSYS_JAX_PLUGINS=str(repo_root / PLUGIN),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "nnx_llama:tiny" in run.stdout and "layers/wq/kernel" in run.stdout and "kv_heads" in run.stdout
