"""Test setup: 8 simulated CPU devices, asked for before JAX starts its backend."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "the suite expects 8 simulated CPU devices"
    return devs


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The shared end-to-end run: 40 steps of the tiny model, checkpointed every 5; returns its
    stdout, its metrics records and its checkpoint folder."""
    from recipe_runs import FLAGS, run

    from mlsys_jax.train.metrics import read_jsonl

    ckpt = tmp_path_factory.mktemp("whole")
    out = run(*FLAGS, "--ckpt-dir", str(ckpt))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, read_jsonl(ckpt / "metrics.jsonl"), ckpt
