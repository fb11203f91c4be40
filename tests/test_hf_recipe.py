"""The recipe and the CLI with Hugging Face folders: fine-tune an imported model with its own
tokenizer, survive SIGKILL like any run, export the result back, and refuse a folder that cannot
work with one message before any device is touched."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from recipe_runs import CORPUS, ROOT, env, kill, logged_steps, recipe, run, start_and_wait, unboxed
from safetensors.numpy import load_file

from mlsys_jax.models import hf
from mlsys_jax.train.metrics import losses_by_step, read_jsonl

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
# fmt: off
FLAGS = ["--init-from-hf", str(FIXTURES / "llama3"), "--mesh", "cpu-8", "--strategy", "fsdp_tp", "--batch", "8",
         "--seq", "32", "--steps", "12", "--ckpt-every", "3", "--eval-every", "12", "--eval-batches", "1",
         "--sample-tokens", "4", "--no-progress", "--data", CORPUS, "--dtype", "float32"]
# fmt: on


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlsys_jax.cli", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env(), timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fine_tune")
    out = run(*FLAGS, "--ckpt-dir", str(folder))
    assert out.returncode == 0, out.stderr[-3000:]
    return folder, out.stdout


@pytest.mark.slow
def test_fine_tuning_starts_from_the_folder_with_its_tokenizer(uninterrupted):
    folder, stdout = uninterrupted
    assert f"initialized from {FIXTURES / 'llama3'}: " in stdout
    start = next(r for r in read_jsonl(folder / "metrics.jsonl") if r.get("event") == "start")
    assert start["settings"]["model"] == f"hf:{FIXTURES / 'llama3'}"
    assert start["settings"]["tokenizer"] == str(FIXTURES / "llama3")
    assert start["settings"]["model_config"]["rope_scaling"]["factor"] == 8.0
    losses = losses_by_step(read_jsonl(folder / "metrics.jsonl"))
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]


@pytest.mark.slow
def test_a_fine_tune_killed_with_sigkill_resumes_exactly(tmp_path, uninterrupted):
    """Killed, then the same command: the losses of the uninterrupted run. Resuming reads the
    run's own checkpoint, not the source weights (here deleted in between)."""
    reference, _ = uninterrupted
    source = tmp_path / "llama3"
    shutil.copytree(FIXTURES / "llama3", source)
    run_dir = tmp_path / "run"
    flags = [str(source) if f == str(FIXTURES / "llama3") else f for f in FLAGS]
    command = recipe(*flags, "--ckpt-dir", str(run_dir))
    saved = lambda: run_dir.is_dir() and any(p.name.isdigit() for p in run_dir.iterdir())  # a complete checkpoint
    proc = start_and_wait(command, lambda: saved() and max(logged_steps(run_dir / "metrics.jsonl"), default=0) >= 4)
    kill(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (source / "model.safetensors").unlink()
    again = subprocess.run(command, check=False, capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stdout and "initialized from" not in again.stdout, again.stdout
    assert losses_by_step(read_jsonl(run_dir / "metrics.jsonl")) == losses_by_step(
        read_jsonl(reference / "metrics.jsonl")
    )


@pytest.mark.slow
def test_export_hf_writes_the_run_back_as_a_folder_transformers_reads(tmp_path, uninterrupted):
    folder, _ = uninterrupted
    out = cli("export-hf", "--ckpt-dir", str(folder), "--out", str(tmp_path / "export"), "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    exported = hf.open_checkpoint(tmp_path / "export")
    assert exported.config == hf.open_checkpoint(FIXTURES / "llama3").config
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (FIXTURES / "llama3" / name).read_bytes()
    raw = json.loads((tmp_path / "export" / "config.json").read_text())
    assert raw["eos_token_id"] == 319 and "rope_parameters" in raw  # the source's ids and spelling
    trained = load_file(str(tmp_path / "export" / "model.safetensors"))
    original = load_file(str(FIXTURES / "llama3" / "model.safetensors"))
    assert sorted(trained) == sorted(original)
    assert any(not np.allclose(trained[n], original[n]) for n in original)  # 12 steps moved the weights

    again = cli("export-hf", "--ckpt-dir", str(folder), "--out", str(tmp_path / "export"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    empty = cli("export-hf", "--ckpt-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert empty.returncode == 2 and "is not a folder" in empty.stderr and not (tmp_path / "x").exists()


def broken_folders(tmp_path):
    def copy(variant):
        target = tmp_path / f"{variant}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(FIXTURES / variant, target)
        return target

    no_config = copy("llama3")
    (no_config / "config.json").unlink()
    no_shard = copy("llama2")
    (no_shard / "model-00002-of-00005.safetensors").unlink()
    wrong_shape = copy("llama3")
    cfg = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    other_arch = copy("llama3")
    (other_arch / "config.json").write_text(
        json.dumps({**cfg, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
    )
    return {
        no_config: "has no config.json",
        no_shard: "shard model-00002-of-00005.safetensors is missing",
        wrong_shape: "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [32, 64]",
        other_arch: "model_type 'phi3' is not supported",
    }


def test_bad_folders_are_refused_before_any_device_is_touched(tmp_path):
    cases = broken_folders(tmp_path)
    script = f"""
import json
from jax._src import xla_bridge
from mlsys_jax.models.hf import HFError
from mlsys_jax.train.config import RunConfig
from mlsys_jax.train.setup import set_up
messages = []
for folder in {[str(p) for p in cases]!r}:
    try:
        set_up(RunConfig.of(init_from_hf=folder, ckpt_dir={str(tmp_path / "run")!r}))
    except HFError as err:
        messages.append(str(err))
print(json.dumps({{"messages": messages, "devices_started": xla_bridge.backends_are_initialized()}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["devices_started"]
    assert len(result["messages"]) == len(cases)
    for message, expected in zip(result["messages"], cases.values()):
        assert expected in message and "Fix:" in message
    assert not (tmp_path / "run").exists()


def test_the_recipe_prints_one_line_and_exits_2_for_a_bad_folder(tmp_path):
    bad = next(iter(broken_folders(tmp_path)))
    out = run("--init-from-hf", str(bad), "--ckpt-dir", str(tmp_path / "run"), timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr and "has no config.json" in out.stderr


def test_a_model_named_beside_init_from_hf_is_refused(tmp_path):
    out = run("--init-from-hf", str(FIXTURES / "llama3"), "--model", "tiny", "--ckpt-dir", str(tmp_path), timeout=120)
    assert out.returncode == 2 and "takes the model from that folder's config.json" in unboxed(out.stderr)


def test_plan_shows_an_hf_folder_before_any_weights_are_read():
    out = cli("plan", "--model", f"hf:{FIXTURES / 'qwen2'}", "--mesh", "data=2,fsdp=2,tensor=2", "--seq", "64")
    assert out.returncode == 0, out.stderr
    assert "layers/bq" in out.stdout
