"""Multi-host: two processes of four CPU devices each, joined by jax.distributed over gloo,
train to the same losses as one process of eight."""

import socket
import subprocess

import numpy as np
import pytest
from recipe_runs import CORPUS, env, recipe, run

from mlsys_jax import distributed
from mlsys_jax.train.metrics import losses_by_step, read_jsonl

# fmt: off
FLAGS = ["--mesh", "cpu-8", "--model", "tiny", "--batch", "16", "--seq", "64", "--steps", "3",
         "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "0", "--data", CORPUS, "--no-progress"]
# fmt: on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same run as one process of eight devices: its metrics records."""
    folder = tmp_path_factory.mktemp("one")
    out = run(*FLAGS, "--ckpt-dir", str(folder))
    assert out.returncode == 0, out.stderr[-3000:]
    return read_jsonl(folder / "metrics.jsonl")


def assert_same_run(one, two):
    a, b = losses_by_step(one), losses_by_step(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    # The same examples in every global batch.
    assert [r["data"] for r in one if "loss" in r] == [r["data"] for r in two if "loss" in r]
    val = lambda recs: next(r["val_loss"] for r in recs if r.get("event") == "end")
    assert val(two) == pytest.approx(val(one), rel=1e-5)


def two_processes(folder, per_process_args, per_process_env):
    procs = [
        subprocess.Popen(
            recipe(*FLAGS, "--ckpt-dir", str(folder), *per_process_args(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(**per_process_env(i)),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow
def test_two_processes_of_four_match_one_process_of_eight(tmp_path, single):
    port = free_port()
    outs = two_processes(
        tmp_path,
        lambda i: [
            "--simulate-devices",
            "4",
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ],
        lambda i: {},
    )
    assert outs[0][0].startswith("cluster: explicit settings, processes: 2, this process: 0, local devices: 4")
    assert "8 devices, 2 process(es)" in outs[0][0]
    assert "plan:" not in outs[1][0] and "steps 0->3" not in outs[1][0]  # only process 0 prints
    two = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["processes"] for r in two if r.get("event") == "start"] == [2]
    assert_same_run(single, two)


@pytest.mark.slow
def test_two_processes_started_by_slurm_join_one_job_without_any_cluster_flag(tmp_path, single):
    """What ``srun --ntasks 2 python recipes/train_lm.py`` gives each process: SLURM's variables."""
    port = free_port()
    slurm = lambda i: {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": str(i),
        "SLURM_LOCALID": str(i),
        "JAX_COORDINATOR_PORT": str(port),
    }
    outs = two_processes(tmp_path, lambda i: [], slurm)
    assert outs[0][0].startswith("cluster: SLURM, processes: 2, this process: 0, local devices: 4")
    assert "8 devices, 2 process(es)" in outs[0][0]
    two = read_jsonl(tmp_path / "metrics.jsonl")
    starts = [r for r in two if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["processes"] == 2 and starts[0]["cluster"] == "SLURM"
    assert_same_run(single, two)


def test_a_cluster_is_detected_from_its_launcher_environment_alone(monkeypatch):
    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect_cluster() is None
    for name, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }.items():
        monkeypatch.setenv(name, value)
    assert distributed.detect_cluster() == distributed.Cluster("SLURM", 2, 1)
    assert not distributed.is_initialized()  # detecting joins nothing


def test_partial_cluster_settings_are_refused_before_connecting():
    with pytest.raises(distributed.DistributedError, match="together") as err:
        distributed.initialize("localhost:1234", num_processes=2)
    assert "process_id" in str(err.value) and "Fix" in str(err.value)
    with pytest.raises(distributed.DistributedError, match="outside 0..1"):
        distributed.initialize("localhost:1234", num_processes=2, process_id=2)
