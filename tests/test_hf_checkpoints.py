"""Hugging Face Llama-family folders in and out: the logits transformers gave for each variant,
both spellings of the rotary settings, exports that reproduce every tensor, reads that touch
only the slices a device holds (in one process and in two), and one clear message for each
folder that cannot work."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding
from recipe_runs import ROOT, env
from safetensors.numpy import load_file, save_file
from test_multihost import free_port

from mlsys_jax.mesh import make_mesh
from mlsys_jax.models import get_config, hf, llama
from mlsys_jax.models.hf import files as hf_files
from mlsys_jax.models.hf.checkpoint import by_path
from mlsys_jax.models.hf.config import HFError, from_hf
from mlsys_jax.models.hf.export import tree_fetch
from mlsys_jax.parallel import Plan, rules
from mlsys_jax.params import spec_leaves

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
VARIANTS = ["llama2", "llama3", "mistral", "qwen2"]
TRAINED = ["trained_tiny", "trained_qwen2"]


def one_device(specs):
    return jax.tree_util.tree_map(
        lambda _: SingleDeviceSharding(jax.devices()[0]), specs, is_leaf=lambda x: hasattr(x, "logical_axes")
    )


def load(folder, **overrides):
    ckpt = hf.open_checkpoint(folder, dtype="float32", **overrides)
    specs = llama.param_specs(ckpt.config)
    return ckpt, hf.load_params(ckpt, specs, one_device(specs))


@jax.jit(static_argnums=2)
def logits(params, tokens, cfg):
    return llama.forward(params, tokens, cfg)


def file_tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "reference_logits.npz")


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_gives_the_logits_transformers_gave(reference, variant):
    ckpt, params = load(FIXTURES / variant)
    np.testing.assert_allclose(logits(params, reference["tokens"], ckpt.config), reference[variant], rtol=0, atol=1e-4)


def test_the_variants_read_what_makes_them_differ():
    assert hf.open_checkpoint(FIXTURES / "llama2").config.rope_theta == 50_000.0
    assert hf.open_checkpoint(FIXTURES / "llama2").tensors.files["lm_head.weight"].name.startswith("model-0000")
    llama3 = hf.open_checkpoint(FIXTURES / "llama3").config
    assert llama3.tie_embeddings and llama3.rope_scaling is not None
    assert llama3.rope_scaling.original_max_position == 64 and llama3.rope_scaling.factor == 8.0
    assert hf.open_checkpoint(FIXTURES / "mistral").config.sliding_window == 4
    assert hf.open_checkpoint(FIXTURES / "qwen2").config.qkv_bias


@pytest.mark.parametrize(
    "variant, without",
    [("llama3", {"rope_scaling": None}), ("mistral", {"sliding_window": None}), ("qwen2", {"qkv_bias": False})],
)
def test_each_variant_feature_changes_the_logits(reference, variant, without):
    """The fixtures exercise each feature: dropping it moves the logits far beyond tolerance."""
    ckpt, params = load(FIXTURES / variant)
    if not without.get("qkv_bias", True):
        params["layers"] = {k: v for k, v in params["layers"].items() if k not in ("bq", "bk", "bv")}
    cfg = ckpt.config.replace(**without)
    assert np.abs(logits(params, reference["tokens"], cfg) - reference[variant]).max() > 0.1


def test_both_spellings_of_the_rotary_settings_give_one_config():
    new = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    assert "rope_parameters" in new  # transformers 5 wrote this spelling
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = {**params, "type": params.pop("rope_type")}  # the oldest key name for the kind
    old["torch_dtype"] = "float32"
    assert from_hf(old) == from_hf(new)
    plain = {k: v for k, v in old.items() if k != "rope_scaling"}
    assert from_hf(plain).rope_scaling is None and from_hf(plain).rope_theta == 500_000.0


@pytest.mark.parametrize("variant", VARIANTS + TRAINED)
def test_export_reproduces_every_tensor_name_by_name(tmp_path, variant):
    source = FIXTURES / variant
    ckpt, params = load(source)
    dtype = ckpt.tensors.dtypes["model.norm.weight"]
    hf.export_folder(
        ckpt.config, tree_fetch(params), tmp_path / "out", dtype=dtype, source=source, max_shard_bytes=100_000
    )
    original, exported = file_tensors(source), file_tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)  # bit-identical
    assert hf.open_checkpoint(tmp_path / "out").config == ckpt.config.replace(dtype="bfloat16")
    if (source / "tokenizer.json").exists():
        assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at 100 kB


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_export_in_a_narrower_dtype_rounds_each_tensor(tmp_path, dtype, tol):
    ckpt, params = load(FIXTURES / "llama2")
    hf.export_folder(ckpt.config, tree_fetch(params), tmp_path / "out", dtype=dtype)
    narrow = hf.open_checkpoint(tmp_path / "out")
    assert set(narrow.tensors.dtypes.values()) == {dtype}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype
    for name, value in file_tensors(FIXTURES / "llama2").items():
        np.testing.assert_allclose(file_tensors(tmp_path / "out")[name].astype(np.float32), value, rtol=tol, atol=1e-6)


@pytest.mark.parametrize("variant", TRAINED)
def test_transformers_reads_our_export_of_a_model_trained_here(variant):
    """The export of a model trained here (tiny from scratch; qwen2 fine-tuned, saved in bf16),
    loaded by transformers: its logits and ours agree."""
    saved = np.load(FIXTURES / f"export_logits_{variant}.npz")
    ckpt, params = load(FIXTURES / variant)
    np.testing.assert_allclose(logits(params, saved["tokens"], ckpt.config), saved["logits"], rtol=0, atol=1e-4)


def test_under_fsdp_tp_each_device_array_is_read_as_its_slice(devices):
    ckpt = hf.open_checkpoint(FIXTURES / "llama2", dtype="float32")
    model = llama.language_model(ckpt.config)
    plan = Plan(make_mesh({"fsdp": 4, "tensor": 2}), rules("fsdp_tp"))
    params = hf.load_params(ckpt, model.specs, plan.param_shardings(model.specs))
    whole = file_tensors(FIXTURES / "llama2")
    reads = ckpt.tensors.reads
    # Every element is read once: the devices' distinct shards partition each tensor.
    assert reads.nbytes == sum(v.nbytes for v in whole.values())
    for name, box in reads.boxes:
        fraction = np.prod([s.stop - s.start for s in box]) / np.prod(ckpt.tensors.shapes[name])
        assert fraction <= 0.25, (name, box)  # fsdp=4 splits every parameter at least four ways
    table = by_path(ckpt.config)
    shardings = jax.tree_util.tree_leaves(plan.param_shardings(model.specs))
    for (path, _), array, sharding in zip(spec_leaves(model.specs), jax.tree_util.tree_leaves(params), shardings):
        m = table[path]
        full = (
            np.stack([m.to_ours(whole[m.file_name(i)]) for i in range(ckpt.config.n_layers)])
            if m.layered
            else m.to_ours(whole[m.name])
        )
        assert array.sharding == sharding
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])


@pytest.mark.slow
def test_two_processes_each_read_only_their_part(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "workers" / "read_hf_slices.py"),
                str(FIXTURES / "llama2"),
                str(port),
                str(i),
                str(tmp_path / f"{i}.json"),
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    for i in range(2):
        report = json.loads((tmp_path / f"{i}.json").read_text())
        assert report["correct"]
        assert report["bytes_read"] == report["distinct_local_bytes"] == report["file_bytes"] // 2
        assert report["largest_read_fraction"] <= 0.25


# --- folders that cannot work ------------------------------------------------------------------


def copy(tmp_path, variant="llama2"):
    out = tmp_path / variant
    shutil.copytree(FIXTURES / variant, out)
    return out


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_folder_without_config_json_is_named(tmp_path):
    folder = copy(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(HFError, match=r"llama2 has no config.json, so it is not a Hugging Face checkpoint folder"):
        hf.open_checkpoint(folder)


def test_a_missing_shard_is_named(tmp_path):
    folder = copy(tmp_path)
    (folder / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(
        HFError, match=r"shard model-00003-of-00005.safetensors is missing, though .*index.json lists it"
    ):
        hf.open_checkpoint(folder)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    folder = edit_config(copy(tmp_path, "llama3"), intermediate_size=96)
    with pytest.raises(
        HFError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[128, 64\] .*implies \[96, 64\]"
    ):
        hf.open_checkpoint(folder)


def test_a_damaged_shard_is_named(tmp_path):
    folder = copy(tmp_path, "mistral")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(HFError, match=r"model.safetensors is not a readable safetensors file"):
        hf.open_checkpoint(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"model_type 'gpt2' is not supported"),
        (
            {"architectures": ["LlamaForSequenceClassification"]},
            r"unsupported field architectures='LlamaForSequenceClassification'",
        ),
        ({"hidden_act": "gelu"}, r"unsupported field hidden_act='gelu'"),
        ({"attention_bias": True}, r"unsupported field attention_bias=True"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            r"unsupported field rope_parameters.rope_type='yarn'",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta": 1, "rope_theta": 1e4}},
            r"unsupported field rope_parameters.beta=1",
        ),
        ({"num_experts": 8}, r"unsupported field 'num_experts'=8: .* will not guess"),
    ],
)
def test_what_the_family_does_not_compute_is_refused_by_name(tmp_path, changes, message):
    folder = edit_config(copy(tmp_path), **changes)
    with pytest.raises(HFError, match=message):
        hf.open_checkpoint(folder)


def test_qwen2_per_layer_windows_are_refused(tmp_path):
    folder = edit_config(copy(tmp_path, "qwen2"), use_sliding_window=True, sliding_window=4)
    with pytest.raises(HFError, match=r"unsupported field use_sliding_window=True"):
        hf.open_checkpoint(folder)


def test_a_tensor_the_family_does_not_use_is_refused(tmp_path):
    folder = copy(tmp_path, "qwen2")
    edit_config(
        folder,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        use_sliding_window=None,
        max_window_layers=None,
        layer_types=None,
    )
    with pytest.raises(
        HFError,
        match=r"holds tensor 'model.layers.0.self_attn.k_proj.bias' \(and 5 more\), which this model does not use",
    ):
        hf.open_checkpoint(folder)


def test_an_hf_folder_names_a_model_like_a_preset():
    assert get_config(f"hf:{FIXTURES / 'mistral'}").sliding_window == 4
    assert get_config(f"hf:{FIXTURES / 'llama2'}", dtype="float32").dtype == "float32"


def test_a_full_disk_during_export_leaves_nothing_behind(tmp_path, monkeypatch):
    ckpt, params = load(FIXTURES / "llama2")
    written = []

    def full_disk(tensors, path, metadata=None):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_files, "save_file", full_disk)
    with pytest.raises(hf_files.HFWriteError, match=r"No space left on device\); nothing was written there"):
        hf.export_folder(ckpt.config, tree_fetch(params), tmp_path / "out", max_shard_bytes=100_000)
    assert written and list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_an_export_racing_another_to_the_same_folder_leaves_the_winner_alone(tmp_path, monkeypatch):
    ckpt, params = load(FIXTURES / "llama2")

    def other_export_finishes(tensors, path, metadata=None):
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "theirs").write_text("kept")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_files, "save_file", other_export_finishes)
    with pytest.raises(HFError, match=r"appeared while this export was writing; it was left as it is"):
        hf.export_folder(ckpt.config, tree_fetch(params), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "theirs").read_text() == "kept"
