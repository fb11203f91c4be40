"""Pipelined training end to end: the recipe trains under a pipeline schedule, a checkpoint moves
between pipelined and unpipelined plans in both directions and training goes on to the same
losses, and a pipeline spans two processes joined over gloo."""

import shutil
import socket
import subprocess

import numpy as np
import pytest
from recipe_runs import CORPUS, env, recipe, run

from mlsys_jax.train.metrics import losses_by_step, read_jsonl

# fmt: off
COMMON = ["--model", "small", "--dtype", "float32", "--batch", "32", "--seq", "32", "--microbatches", "4",
          "--ckpt-every", "2", "--eval-every", "100", "--eval-batches", "1", "--sample-tokens", "0",
          "--no-progress", "--data", CORPUS]
# fmt: on
PIPELINED = ["--mesh", "pipeline=2,data=2,tensor=2", "--schedule", "1f1b"]
FLAT = ["--mesh", "data=8"]


def train(folder, mesh: list[str], steps: int) -> subprocess.CompletedProcess:
    out = run(*COMMON, *mesh, "--steps", str(steps), "--ckpt-dir", str(folder))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(folder) -> dict[int, float]:
    return losses_by_step(read_jsonl(folder / "metrics.jsonl"))


@pytest.mark.slow
def test_a_checkpoint_moves_between_pipelined_and_unpipelined_plans(tmp_path):
    flat, to_pipelined, to_flat = tmp_path / "flat", tmp_path / "to_pipelined", tmp_path / "to_flat"
    train(flat, FLAT, 2)
    shutil.copytree(flat, to_pipelined)
    train(flat, FLAT, 4)
    resumed = train(to_pipelined, PIPELINED, 4)
    assert "mesh: saved 'data=8', now 'pipeline=2,data=2,tensor=2'" in resumed.stdout
    assert "pipeline schedule '1f1b' (10 ticks per step)" in resumed.stdout
    assert "stage 1: .  F0 B0 F1 B1 F2 B2 F3 B3 ." in resumed.stdout
    first = train(to_flat, PIPELINED, 2)
    assert "under pp_dp_tp on pipeline=2,data=2,tensor=2" in first.stdout.replace("\n", " ")
    train(to_flat, FLAT, 4)
    want = losses(flat)
    assert sorted(want) == [1, 2, 3, 4]
    for moved in (to_pipelined, to_flat):
        got = losses(moved)
        np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_pipeline_spans_two_processes_over_gloo(tmp_path):
    """pipeline=2 is the outer mesh axis: stage 0 is process 0's four devices, stage 1 process 1's,
    each stage sharded over fsdp=4 with its weights gathered once per step; they train to the
    losses of the unpipelined model in one process."""
    mesh = ["--mesh", "pipeline=2,fsdp=4", "--schedule", "zb", "--pipeline-weights", "gathered", "--steps", "2"]
    one = run(*COMMON, *FLAT, "--steps", "2", "--ckpt-dir", str(tmp_path / "one"))  # unpipelined, one process
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    procs = [
        subprocess.Popen(
            recipe(*COMMON, *mesh, "--ckpt-dir", str(tmp_path / "two"), "--simulate-devices", "4",
                   "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "8 devices, 2 process(es)" in outs[0][0].replace("\n", " ")
    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == sorted(want) == [1, 2]
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-5)
