"""Ahead-of-time compile time of the train step: a 2-layer and a 24-layer model of the same width.

Layers are stacked and run with ``lax.scan``, so the compiled program holds one layer body
whatever the depth and compile time should barely grow with it. Each repetition clears JAX's
in-memory caches and builds a fresh step; the persistent compilation cache is off. Reports the
median of lowering, of compiling, and of both, per depth, and the 24/2 ratio.

Run from the repository root: ``python bench/compile_time.py`` (writes
bench/results/compile_time.json).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)  # only the CPU backend reads this
jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles only

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.models import build_model

OUT = ROOT / "bench" / "results" / "compile_time.json"
MODEL = "llama:tiny"  # at the width below
STRATEGY = "dp_fsdp_tp"
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
DEPTHS = (2, 24)
REPEATS = 3
BATCH, SEQ = 16, 128
#: The width of bench/strategies.py's model; only n_layers changes.
WIDTH = {"vocab_size": 2048, "d_model": 256, "n_heads": 8, "n_kv_heads": 8, "head_dim": 32, "d_ff": 1024}
TARGET_RATIO = 1.5


# jaxlib ships no type stubs, so a checker sees jax.Device as an unknown variable.
def bench_devices() -> list[jax.Device]:  # pyright: ignore[reportInvalidTypeForm]
    devs = jax.devices()
    return devs[:8] if len(devs) >= 8 else jax.devices("cpu")[:8]


def one_compile(n_layers: int, devices: list) -> dict[str, Any]:
    """Lower and compile a fresh train step with cold in-memory caches; also the trip counts
    of the compiled program's loops (the layer scan should run ``n_layers`` times)."""
    jax.clear_caches()
    plan = mj.Plan(mj.make_mesh(MESH, devices=devices), mj.rules(STRATEGY))
    model = build_model(MODEL, n_layers=n_layers, **WIDTH)
    opt = train.adamw(train.OptimConfig(), model.specs)
    step = train.make_train_step(model, plan, opt)
    t0 = time.perf_counter()
    lowered = step.lower(BATCH, SEQ)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    trips = sorted({int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', compiled.as_text())})
    return {"lower": t1 - t0, "compile": t2 - t1, "total": t2 - t0, "loop_trip_counts": trips}


def main() -> None:
    devices = bench_devices()
    one_compile(DEPTHS[0], devices)  # warm up imports and tracing machinery, not measured
    runs: dict[int, list[dict[str, float]]] = {d: [] for d in DEPTHS}
    for _ in range(REPEATS):  # interleave depths so drift affects both alike
        for depth in DEPTHS:
            runs[depth].append(one_compile(depth, devices))
    medians: dict[int, dict[str, Any]] = {
        d: {k: statistics.median(r[k] for r in rs) for k in ("lower", "compile", "total")} for d, rs in runs.items()
    }
    lo, hi = DEPTHS
    ratio = medians[hi]["total"] / medians[lo]["total"]
    trips = {str(d): runs[d][0]["loop_trip_counts"] for d in DEPTHS}
    out = {
        "jax_version": jax.__version__,
        "backend": devices[0].platform,
        "num_devices": len(devices),
        "python": platform.python_version(),
        "strategy": STRATEGY,
        "mesh": MESH,
        "model_width": WIDTH,
        "batch_size": BATCH,
        "seq_len": SEQ,
        "repeats": REPEATS,
        "persistent_cache": bool(jax.config.values["jax_enable_compilation_cache"]),
        "seconds": {
            str(d): {"median": medians[d], "runs": [{k: r[k] for k in ("lower", "compile", "total")} for r in runs[d]]}
            for d in DEPTHS
        },
        "loop_trip_counts": trips,
        "ratio_total": ratio,
        "ratio_compile": medians[hi]["compile"] / medians[lo]["compile"],
        "target_ratio_max": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"AOT compile of the train step ({STRATEGY}, "
        f"{','.join(f'{k}={v}' for k, v in MESH.items())}), median of {REPEATS}"
    )
    for col in ("layers", "lower s", "compile s", "total s"):
        t.add_column(col, justify="right")
    for d in DEPTHS:
        m = medians[d]
        t.add_row(str(d), f"{m['lower']:.2f}", f"{m['compile']:.2f}", f"{m['total']:.2f}")
    console = Console()
    console.print(t)
    console.print(f"{hi}/{lo} layers: {ratio:.2f}x total (target <= {TARGET_RATIO}x); wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
