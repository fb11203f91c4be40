"""One writer per checkpoint folder: the first process of a job holds an advisory lock on
``<folder>/.lock`` for as long as it runs.

The operating system drops the lock when its holder exits, however it exits, so a killed job's
lock never sticks. Only process 0 locks; the other processes of its job follow its verdict, so
every process of one job passes and every process of a second job is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any, Self

from mlsys_jax.train.checkpoint import CheckpointError

LOCK_NAME = ".lock"


def job_key() -> str:
    """What identifies this job in the lock file: the launcher's job id when there is one."""
    for var in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_JOBID", "TORCHELASTIC_RUN_ID", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return f"pid {os.getpid()} on {socket.gethostname()}"


class FolderLock:
    """Hold ``<directory>/.lock`` exclusively, or raise ``CheckpointError`` naming its holder."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.handle: IO[str] | None = None

    def acquire(self, command: str = "") -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open: the lock lives as long as the file
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder(handle)
            handle.close()
            raise CheckpointError(
                f"{self.directory} is in use by another run ({holder}). Two runs writing one folder "
                "would delete each other's checkpoints. Fix: wait for that run to finish or stop it, "
                "or give this one another --ckpt-dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "job": job_key(),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": command,
                }
            )
        )
        handle.flush()
        self.handle = handle

    @staticmethod
    def _holder(handle: IO[str]) -> str:
        handle.seek(0)
        try:
            info: dict[str, Any] = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            info = {}
        if not info:
            return "holder unknown"
        return f"job {info.get('job')}, pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
