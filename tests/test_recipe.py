"""The recipe end to end: its flags, a run that prints its plan and samples, and a run killed
with SIGKILL that, restarted with the same command, reproduces the uninterrupted losses exactly."""

import signal
import subprocess
import time

import pytest
from recipe_runs import FLAGS, by_step, env, recipe, run

from mlsys_jax.train.metrics import losses_by_step, read_jsonl


def test_help_lists_every_flag():
    out = subprocess.run(recipe("--help"), check=False, capture_output=True, text=True, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in (
        "--mesh",
        "--strategy",
        "--model",
        "--steps",
        "--batch",
        "--seq",
        "--lr",
        "--data",
        "--ckpt-dir",
        "--resume",
        "--simulate-devices",
        "--attention-impl",
        "--norm-impl",
        "--loss-impl",
        "--grad-sync",
        "--on-nan",
        "--sync-every-step",
        "--metrics-every",
        "--force",
        "--cluster",
        "--debug",
    ):
        assert flag in out.stdout, flag


@pytest.mark.slow
def test_a_run_prints_its_plan_logs_metrics_and_samples(uninterrupted):
    stdout, records, _ = uninterrupted
    assert stdout.startswith("cluster: none detected, processes: 1, this process: 0, local devices: 8")
    assert "plan: tiny under fsdp_tp on cpu-8 (fsdp=4, tensor=2, 8 devices" in stdout
    assert "layers/wq" in stdout and "optimizer state" in stdout
    assert stdout.count("sample:") == 4
    losses = losses_by_step(records)
    assert sorted(losses) == list(range(1, 41))
    assert losses[40] < losses[1] - 1.0
    assert by_step(records, "val_loss").keys() == {20, 40}
    end = next(r for r in records if r.get("event") == "end")
    assert end["val_loss"] is not None and len(end["samples"]) == 4


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_exactly(tmp_path, uninterrupted):
    _, reference, _ = uninterrupted
    command = recipe(*FLAGS, "--ckpt-dir", str(tmp_path))
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

    again = subprocess.run(command, check=False, capture_output=True, text=True, env=env(), timeout=600)
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
    after = [
        r
        for r in records[
            records.index(next(r for r in records if r.get("event") == "start" and r["step"] == resumed_from)) :
        ]
        if "loss" in r
    ]
    assert [r["step"] for r in after] == list(range(resumed_from + 1, 41))


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_no_resume_refuses_to_overwrite(tmp_path):
    quick = [*FLAGS, "--ckpt-dir", str(tmp_path)]
    quick[quick.index("--steps") + 1] = "5"
    first = run(*quick, "--sample-tokens", "0")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run(*quick, "--sample-tokens", "0")
    assert again.returncode == 0 and "nothing to train: the checkpoint is at step 5" in again.stdout
    assert sorted(losses_by_step(read_jsonl(tmp_path / "metrics.jsonl"))) == [1, 2, 3, 4, 5]
    second = run(*quick, "--no-resume")
    assert second.returncode == 2
    assert "--no-resume" in second.stderr and "new --ckpt-dir" in second.stderr
    other = run(*quick, "--seq", "32")
    assert other.returncode == 2 and "seq: saved 64, now 32" in other.stderr
    assert "Traceback" not in other.stderr and "data order" in other.stderr
    # How long to train and how fast to learn may change on resume; the recipe says what changed.
    longer = run(*quick, "--steps", "7", "--lr", "1e-3", "--sample-tokens", "0")
    assert longer.returncode == 0, longer.stderr[-2000:]
    changed = "settings changed since that checkpoint (allowed): lr: saved 0.003, now 0.001, steps: saved 5, now 7"
    assert changed in longer.stdout
    assert sorted(losses_by_step(read_jsonl(tmp_path / "metrics.jsonl"))) == [1, 2, 3, 4, 5, 6, 7]
    start = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r.get("event") == "start"][-1]
    assert start["settings"]["steps"] == 7 and start["settings"]["lr"] == 1e-3


def test_a_nonsensical_interval_is_refused_before_any_work():
    from mlsys_jax.train.config import RunConfig

    with pytest.raises(ValueError, match="--eval-every must be at least 1, got 0. Fix"):
        RunConfig.of(eval_every=0)
    with pytest.raises(ValueError, match="--sample-tokens cannot be negative"):
        RunConfig.of(sample_tokens=-1)


def test_a_model_no_family_knows_is_one_message_and_exit_status_2(tmp_path):
    out = run("--model", "lama:small", "--ckpt-dir", str(tmp_path), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: unknown model family 'lama'") and "Did you mean 'llama'" in out.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written
