"""Running the training recipe as a user does, for the end-to-end tests: the command, its
environment, and the small run they share."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlsys_jax.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
CORPUS = str(Path(json.__file__).parent)  # the standard library's json package: small, real text
# fmt: off
FLAGS = ["--mesh", "cpu-8", "--strategy", "fsdp_tp", "--model", "tiny", "--batch", "16", "--seq", "64",
         "--steps", "40", "--ckpt-every", "5", "--eval-every", "20", "--eval-batches", "1",
         "--sample-tokens", "8", "--no-progress", "--data", CORPUS]
# fmt: on


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONUNBUFFERED"] = "1"
    out.update(extra)
    return out


def recipe(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "train_lm.py"), *args]


def run(*args: str, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(recipe(*args), check=False, capture_output=True, text=True, env=env(**extra), timeout=timeout)


def unboxed(text: str) -> str:
    """``text`` with a terminal box's borders removed and its wrapping undone: what a user reads."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", text).split())


def by_step(records: list[dict], key: str) -> dict:
    return {r["step"]: r[key] for r in records if key in r and "step" in r}


def logged_steps(log: Path) -> list[int]:
    return [r["step"] for r in (read_jsonl(log) if log.exists() else []) if "loss" in r]


def start_and_wait(
    command: list[str], until: Callable[[], bool], *, timeout: float = 300, **popen: object
) -> subprocess.Popen:
    """Start ``command`` and poll ``until()`` (bounded); fails if the process ends first."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(command, env=env(), **popen)  # type: ignore[call-overload]
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not until():
        time.sleep(0.02)
    if proc.poll() is not None or not until():
        proc.kill()
        raise AssertionError(f"{command} ended (status {proc.returncode}) before the awaited moment")
    return proc


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=120)
