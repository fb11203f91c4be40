"""Checkpoints: restore onto another mesh and strategy with identical values, never restore a
partial save, keep the last K, and refuse to resume a different run."""

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.models import get_config, llama
from mlsys_jax.train.checkpoint import Checkpointer, CheckpointError
from mlsys_jax.train.config import compare_settings

MODEL = llama.language_model(get_config("tiny", dtype="float32"))
OPT = train.adamw(train.OptimConfig(), MODEL.specs)
TP = mj.rules("tp").override(params={"kv_heads": None}, activations={"kv_heads": None})


@pytest.fixture(scope="module")
def trained_fsdp_state():
    """A state one optimizer step in, so Adam's moments are not zeros."""
    plan = mj.Plan(mj.make_mesh(fsdp=8), mj.rules("fsdp"))
    state = train.init_state(plan, MODEL.specs, OPT, seed=0)
    step = train.make_train_step(MODEL, plan, OPT, donate=False)
    t = np.random.default_rng(0).integers(0, 384, (8, 17)).astype(np.int32)
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "mask": np.ones((8, 16), bool)}
    state, _ = step(state, {k: jax.device_put(v, step.batch_shardings[k]) for k, v in batch.items()})
    return state


def test_saved_as_fsdp_on_8_restores_as_tp_on_4(devices, tmp_path, trained_fsdp_state):
    ckpt = Checkpointer(tmp_path, save_every=1)
    assert ckpt.save(1, trained_fsdp_state, {"next_index": 1}, {"run": "a"})
    ckpt.wait()
    tp4 = mj.Plan(mj.make_mesh(tensor=4, devices=devices[:4]), TP)
    target = train.abstract_state(tp4, MODEL.specs, OPT)
    restored = Checkpointer(tmp_path).restore(target)
    assert restored.step == 1 and restored.data_state == {"next_index": 1} and restored.meta == {"run": "a"}
    for got, want, abstract in zip(
        jax.tree.leaves(restored.state), jax.tree.leaves(trained_fsdp_state), jax.tree.leaves(target)
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(abstract.sharding, got.ndim)
        assert {d.id for d in got.sharding.device_set} == {0, 1, 2, 3}
    ckpt.close()


def test_a_partial_checkpoint_is_never_restored(devices, tmp_path, trained_fsdp_state):
    ckpt = Checkpointer(tmp_path, save_every=1)
    ckpt.save(1, trained_fsdp_state, {"next_index": 1}, {})
    ckpt.wait()
    ckpt.close()
    # What a save killed halfway leaves behind: orbax's temporary folder for step 2.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    again = Checkpointer(tmp_path, save_every=1)
    assert again.latest_step() == 1
    plan = mj.Plan(mj.make_mesh(fsdp=8), mj.rules("fsdp"))
    assert again.restore(train.abstract_state(plan, MODEL.specs, OPT)).step == 1
    again.close()


def test_keeps_the_last_k_and_saves_on_the_interval(devices, tmp_path, trained_fsdp_state):
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
    saved = [s for s in range(1, 8) if ckpt.save(s, trained_fsdp_state, {"next_index": s}, {})]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, trained_fsdp_state, {"next_index": 7}, {}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    ckpt.close()


def test_empty_folder_has_nothing_to_restore(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.read_meta()
    ckpt.close()


def test_a_resume_may_change_how_it_runs_but_not_what_it_computes():
    saved = {
        "model": "tiny",
        "seq": 128,
        "steps": 100,
        "lr": 3e-3,
        "mesh": "cpu-8",
        "model_config": {"d_model": 64, "dtype": "bfloat16"},
    }
    now = {
        "model": "small",
        "seq": 128,
        "steps": 200,
        "lr": 1e-3,
        "mesh": "data=8",
        "model_config": {"d_model": 128, "dtype": "float32"},
    }
    change = compare_settings(saved, now)
    assert [k for k, _, _ in change.refused] == ["model", "model_config.d_model"]
    assert [k for k, _, _ in change.allowed] == ["lr", "mesh", "model_config.dtype", "steps"]
    assert ("steps", 100, 200) in change.allowed
    same = compare_settings(saved, saved)
    assert not same.allowed and not same.refused
