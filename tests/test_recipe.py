"""The recipe end to end: its flags, a run that prints its plan and samples, and a run killed
with SIGKILL that, restarted with the same command, reproduces the uninterrupted losses exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlsys_jax.train.metrics import losses_by_step, read_jsonl

CORPUS = str(Path(json.__file__).parent)  # the standard library's json package: small, real text
FLAGS = ["--mesh", "cpu-8", "--strategy", "fsdp_tp", "--model", "tiny", "--batch", "16", "--seq", "64",
         "--steps", "40", "--ckpt-every", "5", "--eval-every", "20", "--eval-batches", "1",
         "--sample-tokens", "8", "--data", CORPUS, "--no-progress"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONUNBUFFERED"] = "1"
    return out


def recipe(repo_root: Path, *args: str) -> list[str]:
    return [sys.executable, str(repo_root / "recipes" / "train_lm.py"), *args]


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r and "step" in r}


def test_help_lists_every_flag(repo_root):
    out = subprocess.run(recipe(repo_root, "--help"), capture_output=True, text=True, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--mesh", "--strategy", "--model", "--steps", "--batch", "--seq", "--lr", "--data",
                 "--ckpt-dir", "--resume", "--simulate-devices", "--attention-impl", "--norm-impl",
                 "--loss-impl"):
        assert flag in out.stdout, flag


@pytest.fixture(scope="module")
def uninterrupted(repo_root, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("whole")
    out = subprocess.run(recipe(repo_root, *FLAGS, "--ckpt-dir", str(ckpt)), capture_output=True,
                         text=True, env=env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, read_jsonl(ckpt / "metrics.jsonl")


@pytest.mark.slow
def test_a_run_prints_its_plan_logs_metrics_and_samples(uninterrupted):
    stdout, records = uninterrupted
    assert "plan: tiny under fsdp_tp on cpu-8 (fsdp=4, tensor=2, 8 devices" in stdout
    assert "layers/wq" in stdout and "optimizer state" in stdout
    assert stdout.count("sample:") == 4
    losses = losses_by_step(records)
    assert sorted(losses) == list(range(1, 41))
    assert losses[40] < losses[1] - 1.0
    assert by_step(records, "val_loss").keys() == {20, 40}
    end = [r for r in records if r.get("event") == "end"][0]
    assert end["val_loss"] is not None and len(end["samples"]) == 4


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_exactly(repo_root, tmp_path, uninterrupted):
    _, reference = uninterrupted
    command = recipe(repo_root, *FLAGS, "--ckpt-dir", str(tmp_path))
    log = tmp_path / "metrics.jsonl"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.time() + 300
    killed_at = 0
    while time.time() < deadline and proc.poll() is None:
        done = [r["step"] for r in (read_jsonl(log) if log.exists() else []) if "loss" in r]
        if done and max(done) >= 12:
            proc.send_signal(signal.SIGKILL)
            killed_at = max(done)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and killed_at < 40, "the run ended before it was killed"

    again = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    records = read_jsonl(log)
    starts = [r["step"] for r in records if r.get("event") == "start"]
    assert starts[0] == 0 and len(starts) == 2
    resumed_from = starts[1]
    assert resumed_from % 5 == 0 and 0 < resumed_from <= killed_at
    assert f"resumed from step {resumed_from}" in again.stdout

    # Exactly the uninterrupted losses, and the same examples at every step: none read twice
    # (beyond redoing the steps after the checkpoint) and none skipped.
    assert losses_by_step(records) == losses_by_step(reference)
    assert by_step(records, "data") == by_step(reference, "data")
    after = [r for r in records[records.index(next(r for r in records if r.get("event") == "start" and r["step"] == resumed_from)):] if "loss" in r]
    assert [r["step"] for r in after] == list(range(resumed_from + 1, 41))


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_no_resume_refuses_to_overwrite(repo_root, tmp_path, uninterrupted):
    quick = [f for f in FLAGS]
    quick[quick.index("--steps") + 1] = "5"
    first = subprocess.run(recipe(repo_root, *quick, "--ckpt-dir", str(tmp_path), "--sample-tokens", "0"),
                           capture_output=True, text=True, env=env(), timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(recipe(repo_root, *quick, "--ckpt-dir", str(tmp_path), "--sample-tokens", "0"),
                           capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0 and "nothing to train: the checkpoint is at step 5" in again.stdout
    assert sorted(losses_by_step(read_jsonl(tmp_path / "metrics.jsonl"))) == [1, 2, 3, 4, 5]
    second = subprocess.run(recipe(repo_root, *quick, "--ckpt-dir", str(tmp_path), "--no-resume"),
                            capture_output=True, text=True, env=env(), timeout=600)
    assert second.returncode != 0
    assert "--no-resume" in second.stderr and "new --ckpt-dir" in second.stderr
    other = subprocess.run(recipe(repo_root, *quick, "--ckpt-dir", str(tmp_path), "--seq", "32"),
                           capture_output=True, text=True, env=env(), timeout=600)
    assert other.returncode != 0 and "seq: saved 64, now 32" in other.stderr


def test_a_nonsensical_interval_is_refused_before_any_work():
    from mlsys_jax.train.config import RunConfig
    with pytest.raises(ValueError, match="--eval-every must be at least 1, got 0. Fix"):
        RunConfig.of(eval_every=0)
    with pytest.raises(ValueError, match="--sample-tokens cannot be negative"):
        RunConfig.of(sample_tokens=-1)


def test_a_model_no_family_knows_is_one_message_and_exit_status_2(repo_root, tmp_path):
    run = subprocess.run(recipe(repo_root, "--model", "lama:small", "--ckpt-dir", str(tmp_path)),
                         capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: unknown model family 'lama'") and "Did you mean 'llama'" in run.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written
