"""Throughput and utilization figures, and the JSONL file they are written to."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float | None, num_devices: int
) -> float:
    """Achieved model FLOP/s over the mesh's peak (NaN when the peak is unknown)."""
    if not peak_flops_per_device:
        return math.nan
    return tokens_per_s * flops_per_token / (peak_flops_per_device * num_devices)


class MetricsWriteError(RuntimeError):
    """The metrics file could not be written (a full disk, a file size limit)."""


class JsonlWriter:
    """Append one JSON object per line, flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")
        except OSError as err:
            what = f"step {record['step']}" if "step" in record else "the run"
            raise MetricsWriteError(
                f"writing the metrics of {what} to {self.path} failed: {err.strerror or err}. Fix: free "
                "disk space or give a --ckpt-dir with room, then run the same command to resume."
            ) from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file (a torn last line from a killed writer is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def losses_by_step(records: list[dict[str, Any]]) -> dict[int, float]:
    """The training loss of each step; a step logged twice (a resumed run redoing it) keeps
    the later value."""
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}
