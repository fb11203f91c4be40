"""Weak-scaling efficiency of data parallelism: predicted for the shipped hardware presets, and
measured for a tiny model on this host's simulated devices.

Prediction (``mlsys_jax.comm.scaling``): for each preset in ``meshes/`` (its device's peak bf16
FLOP/s and the links it declares; a multi-slice preset's slices are the nodes, joined by its DCN
link) and each model (parameter count from the model registry, FLOPs per token from the model's
``flops_per_token``), one worker's step computes ``BATCH`` sequences of ``SEQ`` tokens at ``MFU``
of peak, then all-reduces bf16 gradients (2 bytes a parameter) with each algorithm: ring, halving-
doubling, hierarchical (nodes as its inner axis), sharded-owner parameter server and a dedicated
single server. Efficiency t(1) / t(N) for N = 1, 2, 4, ... up to the preset's device count,
without overlap (compute then all-reduce) and with full overlap (only what the all-reduce takes
beyond the compute shows: min(1, compute / comm)), the two ends of what a real step gets.

Measured: the data-parallel train step (``rules("dp")``, AdamW) of ``llama:tiny`` at 1, 2, 4 and 8
simulated CPU devices, ``HOST_BATCH`` sequences of ``HOST_SEQ`` tokens per device (weak scaling),
median of timed steps after a compile and a warm-up step. Predicted from the measured 1-device
step ``t1`` and the plan view's calibration (``bench/results/calibration-cpu.json``: alpha its
latency, beta 1 / bandwidth; XLA's all-reduce priced as a ring of the float32 gradients). Here the
8 simulated devices share this host's cores, so the measured scaling checks only the model's
compute term: the predicted all-reduce is well under a millisecond against compute that the
devices split between them. The host's compute term is ``t1 * N`` (one device alone already gets
every core: the calibration's ``bubble_share`` near 0 says an idle device's cores go to the busy
ones); the dedicated-device prediction (``t1`` at every N) is printed beside it.

Writes bench/results/scaling.json and a PNG. Run from the repository root: ``python
bench/scaling.py`` (about 1 minute, nearly all of it the host measurement; ``--quick`` measures 1
and 2 devices only, ``--no-measure`` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
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

from mlsys_jax.comm import scaling
from mlsys_jax.comm.models import AlphaBeta

PRESETS = ("gpu-h100x8", "gpu-h200x8", "tpu-v5e-256", "tpu-v5p-64", "tpu-v5e-2x256")
MODELS = ("llama:125m", "llama:1b")
ALGOS = ("ring", "halving_doubling", "hierarchical", "parameter_server", "parameter_server_single")
BATCH, SEQ = 8, 2048  # per worker
MFU = 0.4
GRAD_BYTES_PER_PARAM = 2  # bf16 gradients, as the train step reduces its matmul weights' gradients
HOST_MODEL = "llama:tiny"
HOST_BATCH, HOST_SEQ = 8, 128  # per simulated device
HOST_GRAD_BYTES_PER_PARAM = 4  # XLA:CPU all-reduces the gradients in float32
CALIBRATION = ROOT / "bench" / "results" / "calibration-cpu.json"
OUT = ROOT / "bench" / "results" / "scaling.json"
HOST_NOTE = (
    "The 8 simulated devices share this host's cores, so the measured scaling checks only the "
    "model's compute term: the predicted all-reduce is tiny against compute the devices split."
)


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, as the results record it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


# ---- prediction ----------------------------------------------------------------------------


def model_figures(name: str, seq: int) -> dict[str, float]:
    """Parameter count and FLOPs per token of a registered model (no arrays are made)."""
    from mlsys_jax.models import build_model
    from mlsys_jax.params import count_params

    model = build_model(name)
    return {"params": float(count_params(model.specs)), "flops_per_token": float(model.flops_per_token(seq))}


def predict_presets(
    presets: Sequence[str], names: Sequence[str], batch: int, seq: int, mfu: float
) -> list[dict[str, Any]]:
    """Every preset x model x algorithm: the workload, the network and the scaling points."""
    import dataclasses

    from mlsys_jax.meshes import load_preset

    rows = []
    figures = {m: model_figures(m, seq) for m in names}
    for preset_name in presets:
        preset = load_preset(preset_name)
        network = scaling.Network.of_preset(preset)
        counts = scaling.device_counts(preset.num_devices)
        for m in names:
            f = figures[m]
            work = scaling.Workload.of_flops(
                f["flops_per_token"] * batch * seq,
                preset.device.peak_bf16_flops,
                f["params"] * GRAD_BYTES_PER_PARAM,
                mfu,
            )
            for algorithm in ALGOS:
                points = scaling.scaling(work, network, algorithm, counts)
                rows.append(
                    {
                        "preset": preset_name,
                        "model": m,
                        "algorithm": algorithm,
                        "devices": preset.num_devices,
                        "params": f["params"],
                        "compute_s": work.compute_s,
                        "grad_bytes": work.grad_bytes,
                        "network": {
                            "inner": dataclasses.asdict(network.inner),
                            "outer": dataclasses.asdict(network.outer) if network.outer else None,
                            "node_size": network.node_size,
                        },
                        "points": [dataclasses.asdict(p) for p in points],
                    }
                )
    return rows


# ---- measurement on this host --------------------------------------------------------------


def measure_host(counts: Sequence[int], steps: int, say: Any) -> list[dict[str, Any]]:
    """Median seconds of the data-parallel train step at each device count (weak scaling)."""
    import jax
    import numpy as np

    import mlsys_jax as mj
    from mlsys_jax import train
    from mlsys_jax.models import build_model

    model = build_model(HOST_MODEL)
    opt = train.adamw(train.OptimConfig(), model.specs)
    out = []
    for n in counts:
        t0 = time.perf_counter()
        plan = mj.Plan(mj.make_mesh({"data": n}, devices=jax.devices()[:n]), mj.rules("dp"))
        step = train.make_train_step(model, plan, opt)
        state = train.init_state(plan, model.specs, opt)
        tokens = np.random.default_rng(0).integers(0, model.vocab_size, (HOST_BATCH * n, HOST_SEQ + 1), np.int32)
        host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((HOST_BATCH * n, HOST_SEQ), bool)}
        batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in host.items()}
        for _ in range(2):  # compile, then one warm step
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        setup = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        out.append({"devices": n, "step_s": statistics.median(times), "steps": times, "setup_s": setup})
        say(f"host: {n} device(s): {out[-1]['step_s'] * 1e3:.1f} ms per step (compile + warm-up {setup:.1f} s)")
    return out


def host_prediction(measured: Sequence[dict[str, Any]], cal: dict[str, float], params: float) -> list[dict[str, Any]]:
    """Measured against predicted, from the 1-device step: shared-host and dedicated compute."""
    t1 = next(m["step_s"] for m in measured if m["devices"] == 1)
    work = scaling.Workload(t1, params * HOST_GRAD_BYTES_PER_PARAM)
    network = scaling.Network(AlphaBeta(cal["latency"], 1.0 / cal["bandwidth"]))
    rows = []
    for m in measured:
        n = m["devices"]
        shared = scaling.step(work, network, "ring", n, overlap=0.0, shared_host=1.0)
        dedicated = scaling.step(work, network, "ring", n, overlap=0.0)
        rows.append(
            {
                "devices": n,
                "measured_s": m["step_s"],
                "measured_efficiency": t1 / m["step_s"],
                "predicted_s": shared.step_s,
                "predicted_efficiency": shared.efficiency,
                "predicted_comm_s": shared.comm_s,
                "error": (shared.step_s - m["step_s"]) / m["step_s"],
                "dedicated_predicted_s": dedicated.step_s,
                "dedicated_efficiency": dedicated.efficiency,
            }
        )
    return rows


def load_calibration(path: Path) -> dict[str, float]:
    from mlsys_jax.analysis.calibration import Calibration

    data = json.loads(path.read_text())
    cal = Calibration.from_json(data.get("calibration", data))
    return {"latency": cal.latency, "bandwidth": cal.bandwidth, "bubble_share": cal.bubble_share}


# ---- reporting -----------------------------------------------------------------------------


def at(points: Sequence[dict[str, Any]], n: int) -> dict[str, Any] | None:
    return next((p for p in points if p["n"] == n), None)


def preset_table(rows: Sequence[dict[str, Any]], batch: int, seq: int, mfu: float) -> Table:
    t = Table(
        title=f"predicted weak-scaling efficiency, data parallel: {batch} x {seq} tokens per worker at "
        f"{mfu:.0%} MFU, bf16 gradients (no overlap / full overlap)"
    )
    for col in ("preset", "model", "algorithm", "compute (ms)", "grads", "comm @8 (ms)", "eff @8"):
        t.add_column(col, justify="left" if col in ("preset", "model", "algorithm") else "right")
    t.add_column("max N", justify="right")
    t.add_column("comm @max (ms)", justify="right")
    t.add_column("eff @max", justify="right")
    for r in rows:
        last = r["points"][-1]
        eight = at(r["points"], 8) or last
        t.add_row(
            r["preset"],
            r["model"],
            r["algorithm"],
            f"{r['compute_s'] * 1e3:.1f}",
            f"{r['grad_bytes'] / 1e6:.0f} MB",
            f"{eight['comm_s'] * 1e3:.2f}",
            f"{eight['efficiency']:.2f} / {eight['efficiency_overlap']:.2f}",
            str(last["n"]),
            f"{last['comm_s'] * 1e3:.2f}",
            f"{last['efficiency']:.2f} / {last['efficiency_overlap']:.2f}",
        )
    return t


def host_table(rows: Sequence[dict[str, Any]]) -> Table:
    t = Table(title=f"{HOST_MODEL} data-parallel step, {HOST_BATCH} x {HOST_SEQ} tokens per simulated device")
    cols = ("devices", "measured (ms)", "efficiency", "predicted (ms)", "efficiency ", "error", "comm (ms)")
    for col in (*cols, "dedicated eff."):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["devices"]),
            f"{r['measured_s'] * 1e3:.1f}",
            f"{r['measured_efficiency']:.2f}",
            f"{r['predicted_s'] * 1e3:.1f}",
            f"{r['predicted_efficiency']:.2f}",
            f"{r['error'] * 100:+.0f}%",
            f"{r['predicted_comm_s'] * 1e3:.2f}",
            f"{r['dedicated_efficiency']:.2f}",
        )
    return t


def picture(rows: Sequence[dict[str, Any]], host: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    names = list(dict.fromkeys(r["model"] for r in rows))
    panels = len(presets) + (1 if host else 0)
    fig, axes = plt.subplots(len(names), panels, figsize=(3.6 * panels, 3.2 * len(names)), squeeze=False)
    colors = {a: f"C{i}" for i, a in enumerate(ALGOS)}
    for i, m in enumerate(names):
        for j, p in enumerate(presets):
            ax = axes[i][j]
            for r in rows:
                if r["preset"] != p or r["model"] != m:
                    continue
                ns = [q["n"] for q in r["points"]]
                ax.plot(ns, [q["efficiency"] for q in r["points"]], "-", color=colors[r["algorithm"]])
                ax.plot(ns, [q["efficiency_overlap"] for q in r["points"]], "--", color=colors[r["algorithm"]])
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{p}\n{m}", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("efficiency t1 / tN", fontsize=8)
            if i == len(names) - 1:
                ax.set_xlabel("workers N", fontsize=8)
        if host:
            ax = axes[i][-1]
            if i == 0:
                ns = [r["devices"] for r in host]
                ax.plot(ns, [r["measured_efficiency"] for r in host], "ko", label="measured")
                ax.plot(ns, [r["predicted_efficiency"] for r in host], "k-", label="model, shared host")
                ax.plot(ns, [r["dedicated_efficiency"] for r in host], "k:", label="model, own devices")
                ax.set_xscale("log", base=2)
                ax.set_ylim(0, 1.05)
                ax.set_title(f"this host: {HOST_MODEL}\n(8 simulated devices, shared cores)", fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.tick_params(labelsize=7)
                ax.legend(fontsize=6)
            else:
                ax.axis("off")
    for a in ALGOS:
        axes[0][0].plot([], [], "-", color=colors[a], label=a)
    axes[0][0].plot([], [], "k--", label="full overlap")
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle("Data-parallel weak scaling: alpha-beta all-reduce against per-worker compute", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences per worker")
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--mfu", type=float, default=MFU)
    parser.add_argument("--quick", action="store_true", help="measure 1 and 2 devices, 3 steps each")
    parser.add_argument("--no-measure", action="store_true", help="skip the measurement on this host")
    parser.add_argument("--calibration", type=Path, default=CALIBRATION)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    console = Console(width=150)
    say = lambda s: console.print(s, highlight=False, markup=False)
    t0 = time.perf_counter()
    rows = predict_presets(args.presets.split(","), args.models.split(","), args.batch, args.seq, args.mfu)
    console.print(preset_table(rows, args.batch, args.seq, args.mfu))
    best = {}
    for r in rows:
        key = (r["preset"], r["model"])
        last = r["points"][-1]
        if key not in best or last["efficiency"] > best[key][1]:
            best[key] = (r["algorithm"], last["efficiency"], last["n"])
    for (p, m), (a, e, n) in best.items():
        say(f"{p} {m}: best without overlap at N={n}: {a} ({e:.2f})")

    host: list[dict[str, Any]] = []
    cal: dict[str, float] = {}
    if not args.no_measure:
        import jax

        if len(jax.devices()) < NUM_DEVICES:
            raise SystemExit(f"needs {NUM_DEVICES} devices, found {len(jax.devices())}")
        cal = load_calibration(args.calibration)
        counts = [1, 2] if args.quick else [1, 2, 4, 8]
        measured = measure_host(counts, 3 if args.quick else 8, say)
        host = host_prediction(measured, cal, model_figures(HOST_MODEL, HOST_SEQ)["params"])
        console.print(host_table(host))
        say(HOST_NOTE)
        say(
            f"model on this host: compute t1 * N (calibration bubble_share {cal['bubble_share']:.2f}: "
            "an idle device's cores go to the busy ones) + ring all-reduce at the calibration's alpha-beta"
        )
    import jax

    result = {
        "benchmark": "scaling",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host_cores": os.cpu_count(),
        "settings": {
            "presets": args.presets.split(","),
            "models": args.models.split(","),
            "tokens_per_worker": {"batch": args.batch, "seq": args.seq},
            "mfu": args.mfu,
            "grad_bytes_per_param": GRAD_BYTES_PER_PARAM,
            "algorithms": list(ALGOS),
            "overlap": "none: compute + comm; full: compute + max(0, comm - compute)",
            "efficiency": "weak scaling, t(1) / t(N), same per-worker batch",
            "network": "one-slice presets: the slowest link of their axes; multi-slice: slices are nodes, "
            "DCN between them",
        },
        "predictions": rows,
        "host": {
            "model": HOST_MODEL,
            "tokens_per_device": {"batch": HOST_BATCH, "seq": HOST_SEQ},
            "grad_bytes_per_param": HOST_GRAD_BYTES_PER_PARAM,
            "calibration_file": shown_path(args.calibration) if host else None,
            "calibration": cal or None,
            "rows": host,
            "note": HOST_NOTE,
        },
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    picture(rows, host, png)
    say(f"wrote {shown_path(args.out)} and {shown_path(png)}")
    return result


if __name__ == "__main__":
    run()
