"""Files the analysis writes for the user (reports, calibrations): whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class ReportWriteError(OSError):
    """A file the user asked for could not be written (a full disk, no permission)."""


def write_whole(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary beside it, synced, then renamed: a reader
    (or a run killed halfway) never leaves a half-written file, and an older one stays intact
    until the new one is complete. A failure names the file and removes the temporary."""
    target = Path(path).expanduser()
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise ReportWriteError(
            f"could not write {target}: {err.strerror or err}. Nothing was written there (an older file, if any, "
            "is intact). Fix: free space or choose a folder you can write to."
        ) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return target
