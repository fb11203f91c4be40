"""Model families by name: Llama's presets as ``llama:NAME`` (or bare), and a family that lives in
one file of its own running through a plan, the train step and ``mlsys-jax plan`` with no edit
anywhere else."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.models import ConfigError, build_model, canonical_name, get_config, registry

TOY_FILE = "tests/plugins/toy_family.py"


@pytest.fixture(scope="module")
def toy(repo_root):
    spec = importlib.util.spec_from_file_location("toy_family", repo_root / TOY_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # registers the family, as any plugin does on import
    yield module
    registry.unregister_family("toy")
    del sys.modules[spec.name]


def test_llama_presets_answer_to_both_spellings():
    assert get_config("llama:7b") == get_config("7b")
    assert canonical_name("7b") == "llama:7b"
    assert get_config("llama:tiny", n_layers=3).n_layers == 3
    assert build_model("llama:tiny").num_layers == 2


@pytest.mark.parametrize(
    "name, message",
    [
        ("llama:7bb", "unknown model 'llama:7bb'.*Did you mean '7b'"),
        ("lama:7b", "unknown model family 'lama'.*Did you mean 'llama'.*MLSYS_JAX_PLUGINS"),
    ],
)
def test_unknown_names_say_what_exists(name, message):
    with pytest.raises(ConfigError, match=message):
        get_config(name)


def test_an_override_the_config_lacks_is_named():
    with pytest.raises(ConfigError, match=r"no config field\(s\) \['n_expert'\]"):
        get_config("tiny", n_expert=4)


def test_a_family_from_its_own_file_runs_through_a_plan_and_the_train_step(devices, toy):
    model = build_model("toy:small")
    # Presets keep an axis they do not know whole; a rule shards it.
    whole = mj.Plan(mj.make_mesh(fsdp=4, tensor=2), mj.rules("fsdp_tp"))
    assert {p.path: p.spec for p in whole.placements(model.specs)}["layers/w_in"] == P(None, None, "fsdp")
    plan = mj.Plan(mj.make_mesh(fsdp=4, tensor=2), mj.rules("fsdp_tp").override(params={"experts": "tensor"}))
    assert {p.path: p.spec for p in plan.placements(model.specs)}["layers/w_in"] == P(None, "tensor", "fsdp")
    opt_cfg = train.OptimConfig(lr=3e-2, warmup_steps=1, total_steps=10)
    opt = train.adamw(opt_cfg, model.specs)
    state = train.init_state(plan, model.specs, opt, seed=0)
    step = train.make_train_step(model, plan, opt)
    tokens = np.random.default_rng(0).integers(0, 16, (8, 17)).astype(np.int32)  # few symbols
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((8, 16), bool)}
    batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in batch.items()}
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    w_in = state.params["layers"]["w_in"]
    assert w_in.sharding.is_equivalent_to(plan.sharding(P(None, "tensor", "fsdp")), w_in.ndim)
    # It decodes with the shared generator too, though its cache holds nothing.
    from mlsys_jax.serve import generate

    (sampled,) = generate(model, plan, state.params, [tokens[0, :3]], new_tokens=5, temperature=0.0)
    assert sampled.shape == (5,) and (sampled < model.vocab_size).all()


def test_a_rule_for_an_axis_no_family_declares_is_refused():
    with pytest.raises(mj.PlanError, match="'embd' -> 'fsdp' names a logical axis no registered.*Did you mean 'embed'"):
        mj.Plan(mj.make_mesh(fsdp=8), mj.rules("fsdp").override(params={"embd": "fsdp"}))


def test_run_flags_a_family_has_no_field_for_are_refused(toy):
    from mlsys_jax.train.config import RunConfig, model_overrides

    assert model_overrides(RunConfig.of(model="toy:small", dtype="float32")) == {"dtype": "float32", "remat": "none"}
    with pytest.raises(ConfigError, match="--attention-impl does not apply to model 'toy:small'"):
        model_overrides(RunConfig.of(model="toy:small", attention_impl="pallas"))


def plan_command(repo_root, *args, **env):
    run_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    run_env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "mlsys_jax.cli", "plan", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        env=run_env,
        timeout=300,
        check=False,
    )


def test_mlsys_jax_plan_finds_a_family_named_in_the_plugins_variable(repo_root):
    run = plan_command(
        repo_root, "--model", "toy:wide", "--mesh", "gpu-h100x8", MLSYS_JAX_PLUGINS=str(repo_root / TOY_FILE)
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "toy:wide" in run.stdout and "layers/w_in" in run.stdout and "experts" in run.stdout
    missing = plan_command(repo_root, "--model", "toy:wide", MLSYS_JAX_PLUGINS="")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: unknown model family 'toy'")


def test_a_plugin_that_fails_to_load_is_named(tmp_path, monkeypatch):
    broken = tmp_path / "broken_family.py"
    broken.write_text("def family(:\n")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(broken))
    with pytest.raises(ConfigError, match=r"broken_family.py', which failed to load: SyntaxError.*Fix"):
        get_config("nowhere:small")


def test_an_installed_package_registers_its_family_through_an_entry_point(repo_root, tmp_path):
    (tmp_path / "toy_family.py").write_text((repo_root / TOY_FILE).read_text())
    info = tmp_path / "toy_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mlsys_jax.models]\ntoy = toy_family\n")
    code = "from mlsys_jax.models import build_model; print(build_model('toy:small').num_layers)"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo_root}"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "2"
