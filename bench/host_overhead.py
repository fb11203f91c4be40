"""Host overhead per step: the training loop dispatching ahead (metrics read one step late, the
next batch loaded onto the devices while a step runs) against waiting for every step's metrics
before the next (``--sync-every-step``: what a hand-written ``float(loss)`` loop does).

A model small enough that the host's work per step (reading a batch, assembling global arrays,
dispatching, logging) is a large share of the step: ``llama:tiny`` on 8 simulated CPU devices,
batch 8 x 32. Each mode trains ``SHORT`` and then ``LONG`` steps from scratch in the same process
through the library's own loop (``train.setup`` + ``train.loop``); the difference of the two
wall times over ``LONG - SHORT`` steps is the cost of one step, free of compilation, the final
evaluation and the final checkpoint. The floor is the devices' own time: the compiled step back
to back on batches already on the devices, nothing read; a mode's excess over it is the host
overhead the devices wait for. Repeated ``REPEATS`` times, the modes interleaved; the
median is reported.

Writes bench/results/host_overhead-<device>.json and a PNG. Run from the repository root:
``python bench/host_overhead.py``.
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console
from rich.table import Table

from mlsys_jax.train.config import RunConfig
from mlsys_jax.train.loop import run_steps
from mlsys_jax.train.preemption import StopRequests
from mlsys_jax.train.reporting import Reporter
from mlsys_jax.train.setup import set_up

SHORT, LONG, REPEATS = 20, 220, 7
CORPUS = str(Path(json.__file__).parent)
SETTINGS = {
    "mesh": "data=8",
    "model": "tiny",
    "batch": 8,
    "seq": 32,
    "dtype": "float32",
    "data": CORPUS,
    "eval_batches": 1,
    "sample_tokens": 0,
    "progress": False,
}
MODES = {
    "dispatch ahead": {},
    "dispatch ahead, metrics every 10": {"metrics_every": 10},
    "sync every step": {"sync_every_step": True},
}
FLOOR = "device floor (no host work)"


def loop_seconds(mode: dict[str, Any], steps: int) -> float:
    """Wall time of the step loop alone (set-up and compilation excluded) for ``steps`` steps."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = RunConfig.of(**SETTINGS, **mode, steps=steps, ckpt_every=steps, eval_every=steps, ckpt_dir=folder)
        quiet = Console(file=io.StringIO())
        run = set_up(cfg, quiet)
        try:
            with (
                Reporter(quiet, run.log, primary=True, progress=False, total=steps, start=0) as rep,
                StopRequests() as stops,
            ):
                t0 = time.perf_counter()
                run_steps(run, rep, stops)
                elapsed = time.perf_counter() - t0
        finally:
            run.close()
    return elapsed


def per_step_ms(mode: dict[str, Any]) -> float:
    return (loop_seconds(mode, LONG) - loop_seconds(mode, SHORT)) / (LONG - SHORT) * 1e3


def floor_ms() -> float:
    """The compiled step back to back on batches already on the devices, no metrics read, one
    step queued behind the running one (as the loop keeps it)."""
    import jax

    from mlsys_jax.train import data as data_lib
    from mlsys_jax.train.step import TrainStep

    with tempfile.TemporaryDirectory() as folder:
        run = set_up(RunConfig.of(**SETTINGS, steps=LONG, ckpt_dir=folder), Console(file=io.StringIO()))
        try:
            batches = data_lib.iterator(run.dataset, None)
            shardings, batch = run.step_fn.batch_shardings, run.cfg.data.batch
            ready = [data_lib.to_global(next(batches), shardings, batch) for _ in range(LONG)]
            state, previous, t0 = run.state, None, 0.0
            for i in range(LONG):
                if i == SHORT:
                    jax.block_until_ready(state)
                    t0 = time.perf_counter()
                state, metrics = run.compiled(state, ready[i], TrainStep.step_number(i))
                if previous is not None:
                    jax.block_until_ready(previous)
                previous = metrics["loss"]
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - t0
        finally:
            run.close()
    return elapsed / (LONG - SHORT) * 1e3


def picture(rows: list[dict[str, Any]], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3))
    names = [r["mode"] for r in rows][::-1]
    values = [r["ms_per_step"] for r in rows][::-1]
    colors = ["#b0b0b0" if n == FLOOR else "#2b7bba" for n in names]
    bars = ax.barh(names, values, color=colors)
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f} ms", va="center")
    ax.set_xlabel("ms per training step (lower is better); grey: the devices' own time")
    ax.set_title(f"Host overhead per step: llama:tiny, batch 8x32, {device}", fontsize=10)
    ax.set_xlim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import jax

    measured: dict[str, list[float]] = {name: [] for name in (*MODES, FLOOR)}
    for name, mode in MODES.items():  # a first round, not counted: caches and allocators warm up
        per_step_ms(mode)
    floor_ms()
    for _ in range(REPEATS):  # modes interleaved, so a slow spell of the host falls on all of them
        for name, mode in MODES.items():
            measured[name].append(per_step_ms(mode))
        measured[FLOOR].append(floor_ms())
    device = jax.devices()[0].device_kind
    sync, floor = statistics.median(measured["sync every step"]), statistics.median(measured[FLOOR])
    rows = []
    for name, samples in measured.items():
        ms = statistics.median(samples)
        rows.append(
            {
                "mode": name,
                "ms_per_step": ms,
                "steps_per_s": 1e3 / ms,
                "samples_ms": samples,
                "host_overhead_ms": ms - floor,
                "speedup_vs_sync": sync / ms,
            }
        )
    title = f"host overhead per step ({device}, {len(jax.devices())} devices; llama:tiny, batch 8x32)"
    table = Table(title=title)
    for col in ("mode", "ms / step", "steps / s", "over the floor (ms)", "vs sync every step"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(
            r["mode"],
            f"{r['ms_per_step']:.2f}",
            f"{r['steps_per_s']:.1f}",
            f"{r['host_overhead_ms']:+.2f}",
            f"{r['speedup_vs_sync']:.2f}x",
        )
    Console(width=120).print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if jax.default_backend() == "cpu" else device.lower().replace(" ", "-")
    result = {
        "benchmark": "host_overhead",
        "device": device,
        "devices": len(jax.devices()),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "settings": SETTINGS,
        "short_steps": SHORT,
        "long_steps": LONG,
        "repeats": REPEATS,
        "rows": rows,
    }
    (out / f"host_overhead-{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    picture(rows, out / f"host_overhead-{slug}.png", device)
    print(f"wrote {out / f'host_overhead-{slug}.json'} and .png")


if __name__ == "__main__":
    main()
