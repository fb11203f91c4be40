"""Multi-host: two processes of four CPU devices each, joined by jax.distributed over gloo,
train to the same losses as one process of eight."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsys_jax import distributed
from mlsys_jax.train.metrics import losses_by_step, read_jsonl

CORPUS = str(Path(json.__file__).parent)
FLAGS = ["--mesh", "cpu-8", "--model", "tiny", "--batch", "16", "--seq", "64", "--steps", "3",
         "--eval-every", "3", "--eval-batches", "1", "--sample-tokens", "0", "--data", CORPUS,
         "--no-progress"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out["JAX_PLATFORMS"] = "cpu"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_match_one_process_of_eight(repo_root, tmp_path):
    script = str(repo_root / "recipes" / "train_lm.py")
    single = subprocess.run([sys.executable, script, *FLAGS, "--ckpt-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env(), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, script, *FLAGS, "--ckpt-dir", str(tmp_path / "two"),
             "--simulate-devices", "4", "--coordinator", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "8 devices, 2 process(es)" in outs[0][0]
    assert "plan:" not in outs[1][0] and "steps 0->3" not in outs[1][0]  # only process 0 prints

    one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["processes"] for r in two if r.get("event") == "start"] == [2]
    a, b = losses_by_step(one), losses_by_step(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    # The same examples in every global batch.
    assert [r["data"] for r in one if "loss" in r] == [r["data"] for r in two if "loss" in r]
    val = lambda recs: [r["val_loss"] for r in recs if r.get("event") == "end"][0]
    assert val(two) == pytest.approx(val(one), rel=1e-5)


def test_partial_cluster_settings_are_refused_before_connecting():
    with pytest.raises(distributed.DistributedError, match="together") as err:
        distributed.initialize("localhost:1234", num_processes=2)
    assert "process_id" in str(err.value) and "Fix" in str(err.value)
    with pytest.raises(distributed.DistributedError, match="outside 0..1"):
        distributed.initialize("localhost:1234", num_processes=2, process_id=2)
