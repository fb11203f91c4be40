"""All-reduce algorithms built from point-to-point sends, measured against their alpha-beta costs.

On 8 simulated CPU devices, float32, for each message size per device: the ring all-reduce (one
bucket), recursive halving-doubling, the hierarchical all-reduce on a 2 x 4 mesh (inner axis of
4 devices, outer axis of 2: two "nodes" of four), one parameter-server step with an SGD update
(``p - lr * g``), and ``lax.psum`` (XLA's own all-reduce), each inside ``jax.shard_map``.

Method: each algorithm is jitted once per size as a program that runs it ``k`` times in a
``lax.fori_loop``, each on the last one's result (``k`` is an argument, so one compilation
serves every ``k``). After a warm-up, the median of ``--repeats`` calls (``block_until_ready``)
is taken at ``k = 1`` and at ``k = K`` (``K`` chosen per size so the long program runs for
tens of milliseconds); one all-reduce costs ``(t(K) - t(1)) / (K - 1)``. The difference drops
what every call pays once (dispatch and the start of a collective program), so the prediction
leaves out the calibration's ``collective_start_s`` and ``dispatch_s`` too. Inputs are zeros so
a chain of sums never overflows.

Prediction: ``mlsys_jax.comm.models.time_s(cost(...), alpha, beta)`` with alpha the
calibration's ``latency`` (seconds per ring step) and beta ``1 / bandwidth``; ``psum`` is priced
as XLA's ring (2(n-1) steps, 2(n-1)/n * V bytes).

Writes bench/results/collectives-cpu.json and a PNG. Run from the repository root:
``python bench/collectives.py`` (``--quick`` for two small sizes, ``--sizes`` to choose).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_DEVICES = 8
if "jax" not in sys.modules:  # imported by a test, jax is already set up with its own devices
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rich.console import Console
from rich.table import Table

from mlsys_jax.analysis.calibration import median_seconds
from mlsys_jax.comm import models

CALIBRATION = ROOT / "bench" / "results" / "calibration-cpu.json"


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, as the results record it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


INNER, OUTER = 4, 2
LR = 0.01
ALGOS = ("ring", "halving_doubling", "hierarchical", "parameter_server", "psum")
PRESETS = {
    "default": [4**k * 1024 for k in range(1, 8)],  # 4 KiB .. 16 MiB
    "quick": [4 * 1024, 64 * 1024],
    "small": [4**k * 1024 for k in range(1, 5)],
}
TARGET = 0.25
WHY = (
    "The simulated devices are threads sharing 2 host cores and one memory: a 'send' is a "
    "memory copy plus a rendezvous of 8 threads, so each collective-permute pays a fixed "
    "synchronisation cost larger than the per-step latency fitted on XLA's fused all-reduce, and "
    "the algorithms' own work (padding, slicing, sums, writing rows of the gathered result) runs "
    "on the same 2 cores as the copies. The model counts neither: small messages come out about "
    "10x the model (about 0.1 ms per permute against 11 us per step), large ones about 3x (the "
    "extra passes over memory). The parameter server's n-1 pushes (and n-1 pulls) do not depend on "
    "each other, so they can run at once, while each ring step waits for the one before; with the "
    "same steps and bytes in the model, the parameter server is measured faster here. psum is one "
    "fused XLA op, closest to what the calibration was fitted on."
)


# ---- pure helpers --------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """A preset name or a comma list of byte counts (each a positive multiple of 4)."""
    if text in PRESETS:
        return list(PRESETS[text])
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 or s % 4 for s in sizes):
        raise ValueError(f"sizes must be positive multiples of 4 bytes or one of {list(PRESETS)}: {text!r}")
    return sizes


def model_cost(algorithm: str, n: int, nbytes: float) -> models.Cost:
    """The alpha-beta cost of ``algorithm``; ``psum`` as XLA's ring."""
    if algorithm == "psum":
        return models.Cost("psum", n, float(nbytes), 2 * (n - 1), 2 * (n - 1) / n * nbytes)
    if algorithm == "hierarchical":
        return models.cost(algorithm, n, nbytes, inner=INNER, outer=n // INNER)
    return models.cost(algorithm, n, nbytes)


def predict(algorithm: str, n: int, nbytes: float, alpha: float, bandwidth: float) -> float:
    """Predicted seconds for one all-reduce: ``alpha`` per step, ``1 / bandwidth`` per byte."""
    return models.time_s(model_cost(algorithm, n, nbytes), alpha, 1.0 / bandwidth)


def collective_ops(algorithm: str, n: int) -> int:
    """Collective ops one all-reduce runs: one collective-permute per step of the point-to-point
    algorithms, a single all-reduce op for ``psum``."""
    return 1 if algorithm == "psum" else model_cost(algorithm, n, 0).steps


def predict_per_op(algorithm: str, n: int, nbytes: float, alpha: float, bandwidth: float, start: float) -> float:
    """The alpha-beta prediction plus ``start`` seconds for every collective op (the variant)."""
    return predict(algorithm, n, nbytes, alpha, bandwidth) + collective_ops(algorithm, n) * start


def error(measured: float, predicted: float) -> float:
    """Signed relative error of the prediction: (predicted - measured) / measured."""
    return (predicted - measured) / measured


def median_abs(errors: Sequence[float]) -> float:
    return statistics.median(abs(e) for e in errors) if errors else math.nan


def summarize(points: Sequence[dict[str, Any]], key: str = "error") -> dict[str, float]:
    """Median absolute ``key`` error per algorithm, and ``overall`` over every point."""
    out = {a: median_abs([p[key] for p in points if p["algorithm"] == a]) for a in ALGOS}
    out = {a: e for a, e in out.items() if not math.isnan(e)}
    out["overall"] = median_abs([p[key] for p in points])
    return out


def ring_vs_ps(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: measured parameter-server time over ring time (above 1: the ring wins)."""
    by = {(p["algorithm"], p["bytes"]): p for p in points}
    rows = []
    for size in sorted({p["bytes"] for p in points}):
        ring, ps = by.get(("ring", size)), by.get(("parameter_server", size))
        if ring and ps:
            rows.append(
                {
                    "bytes": size,
                    "ps_over_ring": ps["measured_s"] / ring["measured_s"],
                    "ring_bytes_per_worker": ring["bytes_per_device"],
                    "ps_bytes_per_worker": ps["bytes_per_device"],
                }
            )
    return rows


def chain_length(predicted: float, target_s: float, cap: int) -> int:
    """K for the long program: about ``target_s`` of all-reduces, between 3 and ``cap``."""
    return max(3, min(cap, round(target_s / max(predicted, 1e-9))))


def load_calibration(path: Path) -> dict[str, float]:
    """The collective figures of a calibration: a bench result (under its "calibration" key) or a
    file written by ``Calibration.save``."""
    from mlsys_jax.analysis.calibration import Calibration

    data = json.loads(path.read_text())
    cal = Calibration.from_json(data.get("calibration", data))
    return {
        "latency": cal.latency,
        "bandwidth": cal.bandwidth,
        "collective_start_s": cal.collective_start_s,
        "dispatch_s": cal.dispatch_s,
    }


# ---- measuring -----------------------------------------------------------------------------


def build(algorithm: str) -> tuple[Callable[..., Any], Any]:
    """A jitted ``(x, k) -> x`` running ``algorithm`` k times in a row, and its mesh."""
    import jax
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from mlsys_jax import comm

    devices = jax.devices()[:NUM_DEVICES]
    if algorithm == "hierarchical":
        mesh = Mesh(np.array(devices).reshape(NUM_DEVICES // INNER, INNER), ("outer", "inner"))
        spec = P(("outer", "inner"))
    else:
        mesh = Mesh(np.array(devices), ("data",))
        spec = P("data")

    def once(y: jax.Array, x: jax.Array) -> jax.Array:
        if algorithm == "ring":
            return comm.ring_all_reduce(y, "data", buckets=1)
        if algorithm == "halving_doubling":
            return comm.halving_doubling_all_reduce(y, "data")
        if algorithm == "hierarchical":
            return comm.hierarchical_all_reduce(y, "inner", "outer")
        if algorithm == "parameter_server":  # y: the parameters; x: this device's gradients
            return comm.parameter_server_step(x, y, lambda p, g: p - LR * g, "data")
        return lax.psum(y, "data")

    def body(x: jax.Array, k: jax.Array) -> jax.Array:
        return lax.fori_loop(0, k, lambda _, y: once(y, x), x)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)
    return jax.jit(mapped), (mesh, spec)


def measure(
    sizes: Sequence[int], cal: dict[str, float], repeats: int, target_s: float, cap: int, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    points = []
    for algorithm in ALGOS:
        fn, (mesh, spec) = build(algorithm)
        for size in sizes:
            elems = size // 4
            x = jax.device_put(jnp.zeros((elems * NUM_DEVICES,), jnp.float32), NamedSharding(mesh, spec))
            predicted = predict(algorithm, NUM_DEVICES, size, cal["latency"], cal["bandwidth"])
            long = chain_length(predicted, target_s, cap)
            t1 = median_seconds(fn, (x, jnp.int32(1)), repeats)
            tk = median_seconds(fn, (x, jnp.int32(long)), repeats)
            measured = (tk - t1) / (long - 1)
            if measured <= 0:  # noise swamped the difference: fall back to the amortized mean
                measured = tk / long
            c = model_cost(algorithm, NUM_DEVICES, size)
            per_op = predict_per_op(
                algorithm, NUM_DEVICES, size, cal["latency"], cal["bandwidth"], cal["collective_start_s"]
            )
            points.append(
                {
                    "algorithm": algorithm,
                    "bytes": size,
                    "measured_s": measured,
                    "predicted_s": predicted,
                    "error": error(measured, predicted),
                    "predicted_per_op_s": per_op,
                    "error_per_op": error(measured, per_op),
                    "t_1_s": t1,
                    "t_k_s": tk,
                    "k": long,
                    "steps": c.steps,
                    "bytes_per_device": c.bytes_per_device,
                }
            )
            say(f"{algorithm:17s} {human(size):>8s} {measured * 1e3:9.3f} ms  (model {predicted * 1e3:.3f} ms)")
            del x
    return points


# ---- reporting -----------------------------------------------------------------------------


def human(nbytes: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def tables(
    points: Sequence[dict[str, Any]],
    summary: dict[str, float],
    variant: dict[str, float],
    versus: list[dict[str, Any]],
) -> list[Table]:
    main = Table(title=f"all-reduce on {NUM_DEVICES} simulated CPU devices, float32 (per device message)")
    for col in ("algorithm", "size", "measured (ms)", "predicted (ms)", "error", "+start/op (ms)", "error "):
        main.add_column(col, justify="left" if col == "algorithm" else "right")
    for p in points:
        main.add_row(
            p["algorithm"],
            human(p["bytes"]),
            f"{p['measured_s'] * 1e3:.3f}",
            f"{p['predicted_s'] * 1e3:.3f}",
            f"{p['error'] * 100:+.0f}%",
            f"{p['predicted_per_op_s'] * 1e3:.3f}",
            f"{p['error_per_op'] * 100:+.0f}%",
        )
    errs = Table(title=f"median |error| over sizes (target {TARGET:.0%})")
    errs.add_column("algorithm")
    errs.add_column("alpha-beta", justify="right")
    errs.add_column("+ start per op", justify="right")
    for name, e in summary.items():
        errs.add_row(name, f"{e * 100:.0f}%", f"{variant[name] * 100:.0f}%")
    ring = Table(title="ring vs parameter server (measured; > 1x: the ring is faster)")
    for col in ("size", "PS / ring time", "ring bytes / worker", "PS bytes / worker"):
        ring.add_column(col, justify="right")
    for r in versus:
        ring.add_row(
            human(r["bytes"]),
            f"{r['ps_over_ring']:.2f}x",
            human(r["ring_bytes_per_worker"]),
            human(r["ps_bytes_per_worker"]),
        )
    return [main, errs, ring]


def picture(points: Sequence[dict[str, Any]], cal: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {a: f"C{i}" for i, a in enumerate(ALGOS)}
    sizes = sorted({p["bytes"] for p in points})
    grid = np.geomspace(min(sizes), max(sizes), 50)
    for algorithm in ALGOS:
        mine = [p for p in points if p["algorithm"] == algorithm]
        if not mine:
            continue
        color = colors[algorithm]
        ax.plot(
            [p["bytes"] for p in mine],
            [p["measured_s"] * 1e3 for p in mine],
            "o",
            color=color,
            label=f"{algorithm} (measured)",
        )
        model = [predict(algorithm, NUM_DEVICES, s, cal["latency"], cal["bandwidth"]) * 1e3 for s in grid]
        ax.plot(grid, model, "-", color=color, alpha=0.7, linewidth=1.2)
    ax.plot([], [], "-", color="grey", label="lines: alpha-beta model\n(ring = PS = psum)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [human(s) for s in sizes], rotation=30)
    ax.set_xlabel("message size per device (bytes, float32)")
    ax.set_ylabel("time per all-reduce (ms)")
    ax.set_title(
        f"All-reduce on {NUM_DEVICES} simulated CPU devices: measured (points) vs model (lines)\n"
        f"alpha = {cal['latency'] * 1e6:.1f} us/step, bandwidth = {cal['bandwidth'] / 1e9:.2f} GB/s",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default=None, help=f"bytes per device, comma list, or a preset {list(PRESETS)}")
    parser.add_argument("--quick", action="store_true", help="two small sizes, few repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "collectives-cpu.json")
    parser.add_argument("--calibration", type=Path, default=CALIBRATION)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)

    import jax

    if len(jax.devices()) < NUM_DEVICES:
        raise SystemExit(f"needs {NUM_DEVICES} devices, found {len(jax.devices())}")
    sizes = parse_sizes(args.sizes or ("quick" if args.quick else "default"))
    repeats = args.repeats or (3 if args.quick else 7)
    target_s, cap = (0.005, 8) if args.quick else (0.05, 64)
    cal = load_calibration(args.calibration)
    console = Console(width=120)
    t0 = time.perf_counter()
    points = measure(sizes, cal, repeats, target_s, cap, lambda s: console.print(s, highlight=False))
    elapsed = time.perf_counter() - t0
    summary = summarize(points)
    variant = summarize(points, "error_per_op")
    versus = ring_vs_ps(points)
    for table in tables(points, summary, variant, versus):
        console.print(table)
    wins = [r for r in versus if r["ps_over_ring"] > 1]
    console.print(
        "ring beats the parameter server at "
        + (", ".join(f"{human(r['bytes'])} ({r['ps_over_ring']:.2f}x)" for r in wins) if wins else "no size measured")
        + "; both send 2(n-1)/n * V bytes per worker in 2(n-1) steps (model)"
    )
    console.print(f"overall median |error| {summary['overall']:.0%} (target {TARGET:.0%}); measured in {elapsed:.0f} s")
    result = {
        "benchmark": "collectives",
        "device": jax.devices()[0].device_kind,
        "devices": NUM_DEVICES,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "settings": {
            "dtype": "float32",
            "sizes_bytes": sizes,
            "repeats": repeats,
            "warmup": 2,
            "chain_target_s": target_s,
            "chain_cap": cap,
            "hierarchical": f"inner {INNER} x outer {NUM_DEVICES // INNER}",
            "parameter_server_update": f"sgd p - {LR} * g",
            "method": "(t(K) - t(1)) / (K - 1), medians of calls; start and dispatch costs cancel",
            "prediction": "comm.models.time_s with alpha = latency, beta = 1 / bandwidth; no start cost",
            "prediction_variant": "the same plus collective_start_s per collective op (per permute; 1 for psum)",
        },
        "calibration_file": shown_path(args.calibration),
        "calibration": cal,
        "points": points,
        "median_abs_error": summary,
        "median_abs_error_per_op_variant": variant,
        "target_abs_error": TARGET,
        "within_target": summary["overall"] <= TARGET,
        "ring_vs_parameter_server": versus,
        "why": WHY,
        "seconds": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    picture(points, cal, png)
    console.print(f"wrote {args.out} and {png}")
    return result


if __name__ == "__main__":
    run()
