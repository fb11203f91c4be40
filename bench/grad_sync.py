"""The train step with each ``grad_sync`` against XLA's own gradient all-reduce.

For each data-parallel plan (dp on 8 simulated devices, dp_fsdp on 2 x 4) and each of our
algorithms (ring, tree, hierarchical, ps), the same model and batch: compile time, the median
step time over ``--steps`` timed steps after a warm-up, the ratio to ``grad_sync="xla"``, the
collectives in the compiled step (collective-permutes for ours, all-reduces for XLA's), and the
first three losses (equal to XLA's: the tests hold them to rtol 1e-5). On this host the 8 devices
are threads on 2 cores, so every permute is a copy and a thread barrier and nothing overlaps:
the ratio shows what the per-layer sums cost here, not what they would hide behind the backward
on hardware that overlaps (``bench/run_gpu.sh`` runs the overlap flags where a GPU is lent).

Writes bench/results/grad_sync.json. Run from the repository root: ``python bench/grad_sync.py``
(about a minute and a half; ``--model small`` for a bigger model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_DEVICES = 8
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.analysis.calibration import median_seconds
from mlsys_jax.analysis.collectives import collectives
from mlsys_jax.comm.grad_sync import GRAD_SYNCS
from mlsys_jax.models import get_config, llama

MESHES = {"dp": {"data": 8}, "dp_fsdp": {"data": 2, "fsdp": 4}}
OUT = ROOT / "bench" / "results" / "grad_sync.json"


def batch_of(vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    t = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "mask": np.ones((batch, seq), bool)}


def measure(model: Any, strategy: str, grad_sync: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Compile, three steps for their losses, then the median of ``steps`` timed steps."""
    plan = mj.Plan(mj.make_mesh(MESHES[strategy]), mj.rules(strategy))
    optimizer = train.adamw(train.OptimConfig(lr=1e-2, warmup_steps=1, total_steps=100), model.specs)
    step = train.make_train_step(model, plan, optimizer, grad_sync=grad_sync)
    start = time.perf_counter()
    compiled = step.lower(batch, seq).compile()
    compile_s = time.perf_counter() - start
    counts: dict[str, int] = {}
    for c in collectives(compiled.as_text() or ""):
        counts[c.kind] = counts.get(c.kind, 0) + 1
    state = train.init_state(plan, model.specs, optimizer, seed=0)
    place = lambda b: {k: jax.device_put(v, step.batch_shardings[k]) for k, v in b.items()}
    losses = []
    for i in range(3):
        state, metrics = step(state, place(batch_of(model.vocab_size, batch, seq, i)))
        losses.append(float(np.asarray(metrics["loss"])))
    fixed = place(batch_of(model.vocab_size, batch, seq, 99))
    holder = {"state": state}

    def one() -> Any:
        holder["state"], m = step(holder["state"], fixed)
        return m["loss"]

    seconds = median_seconds(one, (), repeats=steps, warmup=1)
    return {
        "strategy": strategy,
        "grad_sync": grad_sync,
        "compile_s": round(compile_s, 3),
        "step_ms": round(seconds * 1e3, 3),
        "collectives": counts,
        "losses": losses,
    }


def table(rows: Sequence[dict[str, Any]]) -> Table:
    t = Table(title="train step by grad_sync (8 simulated CPU devices; ratio to xla in the same run)")
    for col in ("plan", "grad_sync", "compile (s)", "step (ms)", "vs xla", "collectives", "losses"):
        t.add_column(col, justify="left" if col in ("plan", "grad_sync", "collectives", "losses") else "right")
    for r in rows:
        ops = ", ".join(f"{v} {k}" for k, v in sorted(r["collectives"].items()))
        t.add_row(
            r["strategy"],
            r["grad_sync"],
            f"{r['compile_s']:.1f}",
            f"{r['step_ms']:.1f}",
            f"{r['vs_xla']:.2f}x",
            ops,
            " ".join(f"{x:.5f}" for x in r["losses"]),
        )
    return t


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="llama preset (default tiny)")
    parser.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per case (median)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    console = Console(width=160)
    model = llama.language_model(get_config(args.model, dtype="float32"))
    rows = []
    for strategy in MESHES:
        for grad_sync in GRAD_SYNCS:
            row = measure(model, strategy, grad_sync, args.batch, args.seq, args.steps)
            console.print(f"{strategy} {grad_sync}: {row['step_ms']:.1f} ms per step")
            rows.append(row)
    for r in rows:
        base = next(b for b in rows if b["strategy"] == r["strategy"] and b["grad_sync"] == "xla")
        r["vs_xla"] = round(r["step_ms"] / base["step_ms"], 3)
    console.print(table(rows))
    result = {
        "benchmark": "grad_sync",
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {NUM_DEVICES} simulated CPU devices",
        "model": f"llama:{args.model} (float32)",
        "batch": args.batch,
        "seq": args.seq,
        "note": (
            "Median step time over timed steps after a warm-up; ratios against grad_sync='xla' in the same run. "
            "Simulated devices share the host's cores, so nothing overlaps here."
        ),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out.name
    console.print(f"wrote {shown}")
    return result


if __name__ == "__main__":
    run()
