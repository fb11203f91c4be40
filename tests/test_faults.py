"""What a cluster does to a run, done to the recipe as a user runs it: preemption, divergence,
damaged checkpoints, a second run on the same folder, a model that cannot fit, a full disk."""

import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from recipe_runs import FLAGS, by_step, env, kill, logged_steps, recipe, run, start_and_wait

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.models import build_model
from mlsys_jax.train import integrity
from mlsys_jax.train.checkpoint import Checkpointer
from mlsys_jax.train.metrics import losses_by_step, read_jsonl

pytestmark = pytest.mark.slow


def flags(**changes: str) -> list[str]:
    out = list(FLAGS)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def test_sigterm_saves_the_step_it_is_on_and_the_same_command_resumes_exactly(tmp_path, uninterrupted):
    _, reference, _ = uninterrupted
    command = recipe(*FLAGS, "--ckpt-dir", str(tmp_path))
    log = tmp_path / "metrics.jsonl"
    proc = start_and_wait(
        command,
        lambda: max(logged_steps(log), default=0) >= 12,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = [r for r in read_jsonl(log) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    at = stopped[0]["step"]
    assert 12 <= at < 40 and f"SIGTERM received: saved step {at} in {tmp_path}" in out
    assert max(Checkpointer(tmp_path).all_steps()) == at  # the step it was on, not the last interval

    again = subprocess.run(command, check=False, capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {at}" in again.stdout
    records = read_jsonl(log)
    assert losses_by_step(records) == losses_by_step(reference)
    assert by_step(records, "data") == by_step(reference, "data")


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path):
    log = tmp_path / "metrics.jsonl"
    proc = start_and_wait(
        recipe(*FLAGS, "--ckpt-dir", str(tmp_path)),
        lambda: max(logged_steps(log), default=0) >= 2,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.perf_counter() - t0 < 5
    assert "SIGINT (Ctrl-C) received: finishing this step" in err and "interrupted twice: exiting now" in err
    assert "Traceback" not in err and not (tmp_path / "5").exists()


def test_a_diverging_run_stops_at_its_first_non_finite_step_and_keeps_only_finite_checkpoints(devices, tmp_path):
    out = run(*flags(lr="1e6", ckpt_every="2"), "--ckpt-dir", str(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    records = read_jsonl(tmp_path / "metrics.jsonl")
    good = [r for r in records if "loss" in r]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in good)
    last = max(r["step"] for r in good)
    assert out.stderr.startswith(f"error: step {last + 1}: the loss is ")
    assert f"training stopped with the state of step {last}" in out.stderr and "--on-nan skip" in out.stderr

    model = build_model("tiny")
    plan = mj.Plan(mj.make_mesh(fsdp=4, tensor=2), mj.rules("fsdp_tp"))
    optimizer = train.adamw(train.OptimConfig(), model.specs)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() and max(ckpt.all_steps()) == last
    for step in ckpt.all_steps():
        restored = ckpt.restore(train.abstract_state(plan, model.specs, optimizer), step)
        assert integrity.inspect(restored.state)[0], f"step {step} holds non-finite values"
    ckpt.close()


def test_skip_drops_non_finite_steps_counts_them_and_trains_on(tmp_path):
    out = run(
        *flags(lr="1e6", steps="8", sample_tokens="0", eval_every="8"), "--on-nan", "skip", "--ckpt-dir", str(tmp_path)
    )
    assert out.returncode == 0, out.stderr[-2000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    skipped = [r["step"] for r in records if "loss" in r and r.get("skipped")]
    end = next(r for r in records if r.get("event") == "end")
    assert skipped and end["skipped"] == skipped and end["step"] == 8
    assert f"{len(skipped)} step(s) skipped as non-finite" in out.stdout
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [5, 8]  # every save verified finite on device first
    ckpt.close()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, uninterrupted):
    _, reference, finished = uninterrupted
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    assert Checkpointer(folder).all_steps() == [30, 35, 40]
    # Step 40: random bytes over part of its largest array file. Step 35: a garbled settings file.
    data = max((folder / "40" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    rng = random.Random(0)
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] = rng.randrange(256)
    data.write_bytes(bytes(raw))
    (folder / "35" / "meta" / "metadata").write_text("{garbled")

    again = run(*FLAGS, "--ckpt-dir", str(folder))
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [ln for ln in again.stdout.splitlines() if "is damaged" in ln]
    assert len(lines) == 2
    assert lines[0].startswith(f"checkpoint step 40 in {folder} is damaged (the values of ")
    assert lines[1].startswith(f"checkpoint step 35 in {folder} is damaged (its settings file cannot be read")
    assert all("resuming from step 30 instead" in ln and "not deleted" in ln for ln in lines)
    assert sorted(p.name.split("-")[0] for p in (folder / "damaged").iterdir()) == ["35", "40"]
    assert losses_by_step(read_jsonl(folder / "metrics.jsonl")) == losses_by_step(reference)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    log = tmp_path / "metrics.jsonl"
    first = start_and_wait(
        recipe(*flags(steps="100000"), "--ckpt-dir", str(tmp_path)), lambda: (tmp_path / "5").exists()
    )
    try:
        second = run(*flags(steps="100000"), "--ckpt-dir", str(tmp_path))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.startswith(f"error: {tmp_path} is in use by another run (job pid {first.pid}")
        assert first.poll() is None, "the first run was disturbed"
        before = max(logged_steps(log))
        time.sleep(1.0)
        assert max(logged_steps(log)) > before  # still training
    finally:
        kill(first)
    third = run(*flags(steps="12", sample_tokens="0"), "--ckpt-dir", str(tmp_path))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed from step" in third.stdout


#: Runs a command as its only child and reports that child's peak resident memory (KiB) last.
PEAK = (
    "import resource, subprocess, sys; out = subprocess.run(sys.argv[1:], check=False); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(out.returncode)"
)


def test_a_model_that_cannot_fit_is_refused_in_seconds_before_anything_is_allocated(tmp_path):
    for model, seq, part in (("70b", "64", r"parameters \d+\.\d\d GiB"), ("small", "100000", r"activations \d")):
        t0 = time.perf_counter()
        command = recipe(*flags(model=model, seq=seq), "--ckpt-dir", str(tmp_path / model))
        measured = subprocess.run(
            [sys.executable, "-c", PEAK, *command], check=False, capture_output=True, text=True, env=env(), timeout=600
        )
        elapsed = time.perf_counter() - t0
        *lines, peak_kib = measured.stderr.rstrip("\n").split("\n")
        out = subprocess.CompletedProcess(measured.args, measured.returncode, measured.stdout, "\n".join(lines) + "\n")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.startswith(f"error: model {model!r} with batch 16 x {seq}")
        assert "does not fit" in out.stderr and re.search(part, out.stderr)
        assert "of 2.00 GiB" in out.stderr and "too much" in out.stderr and "--force" in out.stderr
        assert elapsed < 60, f"refusing {model} took {elapsed:.0f} s"
        assert not (tmp_path / model).exists()  # nothing written, nothing locked
        assert int(peak_kib) < 3 * 1024 * 1024  # KiB: the refused run's own peak


def test_a_full_disk_is_one_message_naming_the_step_and_older_checkpoints_stay(tmp_path):
    log = tmp_path / "metrics.jsonl"
    proc = start_and_wait(
        recipe(*FLAGS, "--ckpt-dir", str(tmp_path)),
        lambda: (tmp_path / "5").exists(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # From now on no file of the run may grow past a little more than the metrics log: the next
    # checkpoint's array files cannot be written (EFBIG, as a full disk gives ENOSPC).
    cap = log.stat().st_size + 20_000
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (cap, cap))
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith(
        f"error: saving step 10 to {tmp_path} failed: File too large; the earlier checkpoints (steps [5]) are intact"
    )
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [5]
    ckpt.close()
