"""XLA's communication-overlap flags, A/B: one FSDP train step timed under each set of flags.

Each variant runs in its own process (XLA reads ``XLA_FLAGS`` once, when the backend starts):
``baseline`` turns the latency-hiding scheduler off, ``lhs`` turns it on
(``--xla_gpu_enable_latency_hiding_scheduler``, which moves collectives to overlap compute), and
``lhs+pipelined`` adds the pipelined all-gather, reduce-scatter and all-reduce of loops. Every
variant builds the same step (a Llama resized to ~17M parameters, AdamW, ``rules("fsdp")`` over
every local device), compiles it, runs a warm-up step and times ``--steps`` more (median), and
counts the collectives in the compiled program and how many of them were made asynchronous
(``*-start`` ops): what the flags change. On one GPU there are no collectives, so the A/B only
shows that the flags are accepted and cost nothing; the overlap needs several devices.

``--cpu-smoke``: the same on 2 simulated CPU devices with a one-layer tiny model and 2 steps (the
GPU flags are parsed there and unused), so a test can run this script without a GPU. A variant
that would start with less than ``MIN_VARIANT_S`` of ``--budget-s`` left is skipped and recorded.

Writes overlap_flags-<platform>.json into ``--out`` (default bench/results). Run from the
repository root: ``python bench/overlap_flags.py`` (on a GPU machine, about 45 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LHS = "--xla_gpu_enable_latency_hiding_scheduler"
PIPELINED = (
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
)
VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (f"{LHS}=false",),
    "lhs": (f"{LHS}=true",),
    "lhs+pipelined": (f"{LHS}=true", *PIPELINED),
}
#: The step's model: ``llama:tiny`` resized (~17M parameters) so a GPU step is a few milliseconds.
MODEL = {"vocab_size": 8192, "d_model": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 8, "head_dim": 64, "d_ff": 2048}
SMOKE_MODEL = {"n_layers": 1}
BATCH_PER_DEVICE, SEQ = 8, 512
SMOKE_BATCH_PER_DEVICE, SMOKE_SEQ = 2, 32
MIN_VARIANT_S = 10.0
ASYNC = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)-start\b")


def shown_path(path: str | Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def variant_env(base: dict[str, str], flags: Sequence[str], smoke: bool) -> dict[str, str]:
    """The child's environment: ``base`` with ``flags`` appended to its ``XLA_FLAGS`` (any of the
    same flag names dropped first); on CPU smoke runs, 2 simulated devices and the CPU backend."""
    names = {f.split("=")[0] for f in flags}
    if smoke:
        names.add("--xla_force_host_platform_device_count")
    kept = [f for f in base.get("XLA_FLAGS", "").split() if f.split("=")[0] not in names]
    extra = ["--xla_force_host_platform_device_count=2"] if smoke else []
    env = dict(base)
    env["XLA_FLAGS"] = " ".join([*kept, *flags, *extra])
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def async_ops(hlo_text: str) -> int:
    """Collectives the compiler made asynchronous (each ``*-start`` op once)."""
    return sum(1 for line in hlo_text.splitlines() if "=" in line and ASYNC.search(line.split("=", 1)[1]))


def measure(steps: int, smoke: bool) -> dict[str, Any]:
    """Build, compile and time the FSDP step in this process, under its ``XLA_FLAGS``."""
    import jax
    import numpy as np

    import mlsys_jax as mj
    from mlsys_jax import train
    from mlsys_jax.analysis.collectives import collectives
    from mlsys_jax.models import build_model

    devices = jax.local_devices()
    n = len(devices)
    model = build_model("llama:tiny", **(SMOKE_MODEL if smoke else MODEL))
    batch_size = n * (SMOKE_BATCH_PER_DEVICE if smoke else BATCH_PER_DEVICE)
    seq = SMOKE_SEQ if smoke else SEQ
    plan = mj.Plan(mj.make_mesh({"fsdp": n}, devices=devices), mj.rules("fsdp"))
    opt = train.adamw(train.OptimConfig(), model.specs)
    step = train.make_train_step(model, plan, opt)
    t0 = time.perf_counter()
    compiled = step.lower(batch_size, seq).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    state = train.init_state(plan, model.specs, opt)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (batch_size, seq + 1), np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((batch_size, seq), bool)}
    batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in host.items()}
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": n,
        "params": mj.count_params(model.specs),
        "batch": batch_size,
        "seq": seq,
        "compile_s": compile_s,
        "step_s": statistics.median(times),
        "steps_s": times,
        "loss": float(metrics["loss"]),
        "collectives": len(collectives(text)),
        "async_collectives": async_ops(text),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_variant(name: str, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """One variant in a fresh process; its figures, or why it has none."""
    out = args.out / f".overlap-{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--steps", str(args.steps)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    env = variant_env(dict(os.environ), VARIANTS[name], args.cpu_smoke)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": name, "flags": list(VARIANTS[name]), "error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"variant": name, "flags": list(VARIANTS[name]), "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(out.read_text())
    out.unlink()
    return {"variant": name, "flags": list(VARIANTS[name]), "wall_s": wall, **result}


def table(rows: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table

    base = next((r for r in rows if r["variant"] == "baseline" and "step_s" in r), None)
    t = Table(title="FSDP train step under XLA's overlap flags (median step; each variant its own process)")
    for col in ("variant", "devices", "compile (s)", "step (ms)", "vs baseline", "collectives", "async", "note"):
        t.add_column(col, justify="left" if col in ("variant", "note") else "right")
    for r in rows:
        if "step_s" not in r:
            t.add_row(r["variant"], "", "", "", "", "", "", str(r.get("error", ""))[:80])
            continue
        ratio = f"{r['step_s'] / base['step_s']:.3f}x" if base else "-"
        t.add_row(
            r["variant"],
            str(r["devices"]),
            f"{r['compile_s']:.1f}",
            f"{r['step_s'] * 1e3:.2f}",
            ratio,
            str(r["collectives"]),
            str(r["async_collectives"]),
            "",
        )
    return t


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; smoke 2)")
    parser.add_argument("--cpu-smoke", action="store_true", help="2 simulated CPU devices, a one-layer model")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip variants past this many seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.cpu_smoke else 10)
    if args.child:
        Path(args.child).write_text(json.dumps(measure(args.steps, args.cpu_smoke)) + "\n")
        return {}

    from rich.console import Console

    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=140)
    t0 = time.perf_counter()
    rows = []
    for name in names:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < MIN_VARIANT_S:
            rows.append(
                {"variant": name, "flags": list(VARIANTS[name]), "error": f"skipped: {left:.0f} s of budget left"}
            )
            continue
        rows.append(run_variant(name, args, min(left, 600.0)))
        r = rows[-1]
        console.print(
            f"{name}: " + (f"{r['step_s'] * 1e3:.2f} ms per step" if "step_s" in r else r["error"][:300]),
            highlight=False,
            markup=False,
        )
    console.print(table(rows))
    measured = [r for r in rows if "step_s" in r]
    where = measured[0]["platform"] if measured else ("cpu" if args.cpu_smoke else "unknown")
    result = {
        "benchmark": "overlap_flags",
        "python": platform.python_version(),
        "cpu_smoke": args.cpu_smoke,
        "model": "llama:tiny with " + json.dumps(SMOKE_MODEL if args.cpu_smoke else MODEL),
        "rules": "fsdp over every local device",
        "steps": args.steps,
        "variants": rows,
        "seconds": time.perf_counter() - t0,
    }
    path = args.out / f"overlap_flags-{where}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {shown_path(path)}", highlight=False, markup=False)
    return result


if __name__ == "__main__":
    main()
