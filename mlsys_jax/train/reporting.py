"""What a training run tells its user: a live progress bar, a line at each evaluation or event,
and one JSON record per step in ``metrics.jsonl``. Only process 0 of a job reports."""

from __future__ import annotations

import math
from typing import Any, Self

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlsys_jax.train.metrics import JsonlWriter


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


class Reporter:
    """The progress bar, console lines and metrics log of one run."""

    def __init__(
        self, console: Console, log: JsonlWriter, *, primary: bool, progress: bool, total: int, start: int
    ) -> None:
        self.console = console
        self.log = log
        self.primary = primary
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("MFU {task.fields[mfu]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not (progress and primary),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-", mfu="-")

    def say(self, *parts: Any) -> None:
        if self.primary:
            self.bar.console.print(*parts, soft_wrap=all(isinstance(p, str) for p in parts))

    def record(self, record: dict[str, Any]) -> None:
        self.log.write(record)

    def step(self, record: dict[str, Any]) -> None:
        """Log one step's record and move the bar; an evaluation's result gets a line too."""
        self.log.write(record)
        mfu = record.get("mfu")
        mfu_text = "n/a" if mfu is None or math.isnan(mfu) else f"{mfu:.1%}"
        tps = record.get("tokens_per_s")
        if "val_loss" in record:
            self.say(
                f"step {record['step']}: loss {fmt(record['loss'])}, validation loss "
                f"{fmt(record['val_loss'])}, {fmt(tps, ',.0f')} tok/s, MFU {mfu_text}"
            )
        self.bar.update(
            self.task, completed=record["step"], loss=fmt(record["loss"]), tps=fmt(tps, ",.0f"), mfu=mfu_text
        )

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)
