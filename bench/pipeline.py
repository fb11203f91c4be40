"""Pipeline schedules on 8 simulated devices: step time, memory and communication of one
training step's forward and backward, against the unpipelined plan on the same devices.

The model is ``llama:tiny`` with 8 layers in fp32 (two layers per stage at ``pipeline=4``); the
step is a jitted function giving the mean token loss and the gradients of every parameter. The
pipelined cases run ``mlsys_jax.parallel.pipeline.executor.pipeline_loss_and_grads``:

* GPipe, 1F1B, interleaved 1F1B (``v=2``) and ZB-H1 at ``pipeline=4 x data=2``, params rule
  ``layers -> pipeline``, activations ``batch -> data``;
* 1F1B at ``pipeline=4 x fsdp=2``, params ``layers -> pipeline, embed -> fsdp``, activations
  ``batch -> fsdp`` (the ``fsdp`` axis is left to XLA's partitioner inside each stage).

The baseline is the unpipelined plan on the same 8 devices and the same global batch:
``jax.value_and_grad`` of ``loss_sums``' mean under ``data=8`` (params replicated by that plan,
the batch split over ``data``). Each case reports:

* step time: after a warm-up call, ``ROUNDS`` rounds each timing every case ``CALLS`` times
  (``jax.block_until_ready``); the median over rounds, and as a ratio to the baseline the median
  over rounds of the case's time over the baseline's in the same round;
* the schedule's ticks, bubble (idle share of stage-ticks) and peak stash (microbatch inputs a
  stage holds at once), from the ``Schedule`` object;
* temporary bytes per device, ``compiled.memory_analysis().temp_size_in_bytes``;
* collectives per step from the compiled HLO (``mlsys_jax.analysis``: every op times the trip counts
  of its enclosing loops): collective-permute executions and bytes, the bytes both per op as the
  reader gives them (one operand per op, whether or not this device sends) and as the busiest
  device sends them (ops where it is the source of a pair to another device); for the fsdp
  case the weight all-gathers, both as read (every ``lax.switch`` branch counted at every tick: an upper bound)
  and as executed (a branch's collectives counted only at the ticks that run that branch);
* 1F1B's and GPipe's temporary bytes at ``m=16`` against ``m=8``, same microbatch size (so the
  batch doubles), compiled only.

The simulated devices share the host's cores: stages do not run at the same time, so the
step-time ratios measure the executor's overhead here, not a pipeline's speed on accelerators.

Writes bench/results/pipeline-<device>.json and a PNG. Run from the repository root:
``python bench/pipeline.py``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
    ).strip()

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rich.console import Console
from rich.table import Table

import mlsys_jax as mj
from mlsys_jax import analysis
from mlsys_jax.analysis import Collective
from mlsys_jax.models import get_config, llama
from mlsys_jax.models.base import loss_sums
from mlsys_jax.parallel.pipeline import Schedule, make_schedule
from mlsys_jax.parallel.pipeline.executor import gathered_specs, pipeline_loss_and_grads
from mlsys_jax.parallel.rules import Rules

CFG = get_config("tiny", dtype="float32", n_layers=8)
MODEL = llama.language_model(CFG)
STAGES, MICROBATCHES, MICRO_ROWS, SEQ = 4, 8, 4, 32  # global batch MICROBATCHES * MICRO_ROWS
ROUNDS, CALLS = 8, 2
BASELINE = "unpipelined (data=8)"
DATA_RULES = ({"layers": "pipeline"}, {"batch": "data"})
FSDP_RULES = ({"layers": "pipeline", "embed": "fsdp"}, {"batch": "fsdp"})


def case(
    name: str,
    schedule: str,
    virtual: int,
    mesh: dict[str, int],
    rules: tuple,
    m: int = MICROBATCHES,
    keep: str = "inputs",
    base: str | None = None,
    weights: str = "sharded",
):
    return {
        "case": name,
        "schedule": schedule,
        "virtual": virtual,
        "mesh": mesh,
        "rules": rules,
        "microbatches": m,
        "keep": keep,
        "base": base,
        "weights": weights,
    }


PIPE_DATA = {"pipeline": STAGES, "data": 2}
CASES = [
    case("gpipe", "gpipe", 1, PIPE_DATA, DATA_RULES),
    case("1f1b", "1f1b", 1, PIPE_DATA, DATA_RULES),
    case("interleaved v=2", "interleaved", 2, PIPE_DATA, DATA_RULES),
    case("zb (ZB-H1)", "zb", 1, PIPE_DATA, DATA_RULES),
    case("1f1b, fsdp=2", "1f1b", 1, {"pipeline": STAGES, "fsdp": 2}, FSDP_RULES),
    # The same, each stage's weights gathered once per step and held (--pipeline-weights gathered).
    case("1f1b, fsdp=2, gathered", "1f1b", 1, {"pipeline": STAGES, "fsdp": 2}, FSDP_RULES, weights="gathered"),
    # Stashing the forward's residuals instead of the stage input: no recompute in the backward.
    case("gpipe, residuals", "gpipe", 1, PIPE_DATA, DATA_RULES, keep="residuals"),
    case("1f1b, residuals", "1f1b", 1, PIPE_DATA, DATA_RULES, keep="residuals"),
    case("zb, residuals", "zb", 1, PIPE_DATA, DATA_RULES, keep="residuals"),
]
#: Compiled only, for temporary bytes at twice the microbatches (the same microbatch size).
SCALING = [
    case("1f1b m=16", "1f1b", 1, PIPE_DATA, DATA_RULES, m=2 * MICROBATCHES, base="1f1b"),
    case("gpipe m=16", "gpipe", 1, PIPE_DATA, DATA_RULES, m=2 * MICROBATCHES, base="gpipe"),
    case("1f1b residuals m=16", "1f1b", 1, PIPE_DATA, DATA_RULES, 2 * MICROBATCHES, "residuals", "1f1b, residuals"),
    case("gpipe residuals m=16", "gpipe", 1, PIPE_DATA, DATA_RULES, 2 * MICROBATCHES, "residuals", "gpipe, residuals"),
]
KIND_OF_BRANCH = {1: "F", 2: "B", 3: "W"}  # the executor's lax.switch branches: idle, F, B, W


def make_batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (rows, SEQ + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((rows, SEQ), bool)}


# ---- compiling ----------------------------------------------------------------------------


def compile_baseline(devices: list, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    mesh = mj.make_mesh({"data": NUM_DEVICES}, devices=devices)
    plan = mj.Plan(mesh, Rules({}, {"batch": "data"}))
    params = plan.init(MODEL.specs, jax.random.PRNGKey(0))
    placed = jax.device_put(batch, NamedSharding(mesh, P("data")))

    def mean_loss(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        total, count = loss_sums(MODEL, params, batch, plan.layout)
        return total / count

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(mean_loss)).lower(params, placed).compile()
    return {"compiled": compiled, "args": (params, placed), "mesh": mesh, "compile_s": time.perf_counter() - t0}


def compile_case(spec: dict[str, Any], devices: list, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    mesh = mj.make_mesh(spec["mesh"], devices=devices)
    plan = mj.Plan(mesh, Rules(*spec["rules"]))
    params = plan.init(MODEL.specs, jax.random.PRNGKey(0))
    placed = jax.device_put(batch, plan.activation_sharding(("batch", "seq")))
    schedule = make_schedule(spec["schedule"], STAGES, spec["microbatches"], spec["virtual"])
    gathered = spec["weights"] == "gathered"
    stage_specs = gathered_specs(plan.param_pspecs(MODEL.specs), MODEL.layers_key) if gathered else None

    def step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        loss, count, grads, _ = pipeline_loss_and_grads(
            MODEL, schedule, params, batch, mesh, plan.layout, spec["keep"], stage_specs
        )
        return loss / count, grads

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, placed).compile()
    return {
        "compiled": compiled,
        "args": (params, placed),
        "mesh": mesh,
        "schedule": schedule,
        "compile_s": time.perf_counter() - t0,
    }


# ---- reading the compiled programs --------------------------------------------------------


def tick_branch(c: Collective) -> str | None:
    """The work kind (F, B, W) of the ``lax.switch`` branch of the tick loop an op sits in, or
    None for an op outside any branch. The loop body is the first ``while/body`` of the program's
    ``shard_map``; its switch is the first ``cond`` inside it."""
    found = re.search(r"shard_map/while/body/closed_call/cond/branch_(\d+)_fun", c.op_name)
    return KIND_OF_BRANCH.get(int(found.group(1))) if found else None


def executed(c: Collective, schedule: Schedule | None) -> int:
    """Executions per step of ``c`` on the busiest device: an op in a branch of the tick loop
    runs at the ticks whose work is that branch's kind (``m * v`` of each kind per device), not
    at every tick as ``c.count`` has it. A branch nested inside (the head's ``cond`` on the last
    stage) is counted as taken."""
    kind = tick_branch(c)
    if kind is None or schedule is None or c.count % schedule.ticks:
        return c.count  # not attributed to a tick's branch: every execution counted
    return c.count // schedule.ticks * schedule.microbatches * schedule.virtual


def is_weight_gather(c: Collective) -> bool:
    """An all-gather of a parameter rather than an activation: activations here are
    ``(rows, seq, ...)`` and no parameter of this model has a dimension of ``SEQ``."""
    return c.kind == "all-gather" and not any(len(s) >= 2 and s[1] == SEQ for s in c.shapes)


def read_program(built: dict[str, Any]) -> dict[str, Any]:
    compiled, schedule = built["compiled"], built.get("schedule")
    sizes = dict(built["mesh"].shape)
    ops = list(analysis.collectives(compiled.as_text()))
    permutes = [c for c in ops if c.kind == "collective-permute"]
    gathers = [c for c in ops if is_weight_gather(c)]
    in_loop = [c for c in gathers if c.trip_counts]
    summary = analysis.summarize(ops)
    sent: dict[int, int] = {}  # device -> permute bytes it sends per step (self pairs move nothing)
    for c in permutes:
        for src in {s for s, t in c.pairs if s != t}:
            sent[src] = sent.get(src, 0) + c.total_payload_bytes
    out: dict[str, Any] = {
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "permute_ops": len(permutes),
        "permute_count": sum(c.count for c in permutes),
        "permute_bytes": sum(c.total_payload_bytes for c in permutes),
        "permute_in_tick_loop": sum(c.count for c in permutes if c.trip_counts),
        "permute_bytes_sent_busiest_device": max(sent.values(), default=0),
        "collectives": {k: vars(v) for k, v in summary.items() if v.ops},
        "all_counts_exact": all(c.exact for c in ops),
    }
    if gathers:
        out["weight_all_gather"] = {
            "ops": len(gathers),
            "ops_in_tick_loop": len(in_loop),
            "bytes_as_read": sum(c.total_payload_bytes for c in gathers),
            "bytes_executed": sum(executed(c, schedule) * c.payload_bytes for c in gathers),
            "bytes_once": sum(c.payload_bytes for c in gathers),
            "tick_trip_count": schedule.ticks if schedule else None,
            "repeats_as_read": sorted({c.count for c in in_loop}),
            "repeats_executed": sorted({executed(c, schedule) for c in in_loop}),
            "bytes_executed_by_branch": {
                kind or "outside the tick's branches": sum(
                    executed(c, schedule) * c.payload_bytes for c in gathers if tick_branch(c) == kind
                )
                for kind in ("F", "B", "W", None)
                if any(tick_branch(c) == kind for c in gathers)
            },
            "conditional_ops_not_attributed": sum(c.conditional and tick_branch(c) is None for c in gathers),
            "axes": sorted({a for c in gathers for a in analysis.collective_axes(c, sizes)}),
        }
    return out


# ---- timing -------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], args: tuple, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


# ---- output -------------------------------------------------------------------------------

KIB, MIB = 1024, 1 << 20


def print_table(rows: list[dict[str, Any]], device: str, scaling: dict[str, Any]) -> None:
    title = (
        f"pipeline step (forward + backward), llama:tiny 8 layers fp32, {MICROBATCHES} microbatches x "
        f"{MICRO_ROWS} rows x seq {SEQ}, {NUM_DEVICES} {device} devices"
    )
    table = Table(title=title)
    cols = (
        "case",
        "mesh",
        "ms / step",
        "vs unpipelined",
        "ticks",
        "bubble",
        "peak stash",
        "temp MiB / dev",
        "permutes / step",
        "permute KiB / step (ops; busiest sender)",
        "weight AG MiB / step (read; run)",
        "AG repeats (read; run)",
    )
    for col in cols:
        label = col in ("case", "mesh")
        table.add_column(col, justify="left" if label else "right", no_wrap=label)
    for r in rows:
        ag = r.get("weight_all_gather")
        table.add_row(
            r["case"],
            ",".join(f"{k}={v}" for k, v in r["mesh"].items()),
            f"{r['ms_per_step']:.1f}",
            f"{r['ratio_to_unpipelined']:.2f}x",
            "-" if r["ticks"] is None else str(r["ticks"]),
            "-" if r["bubble"] is None else f"{r['bubble']:.3f}",
            "-" if r["peak_stash"] is None else str(r["peak_stash"]),
            f"{r['temp_bytes'] / MIB:.2f}",
            str(r["permute_count"]),
            f"{r['permute_bytes'] / KIB:.0f}; {r['permute_bytes_sent_busiest_device'] / KIB:.0f}",
            "-" if not ag else f"{ag['bytes_as_read'] / MIB:.1f}; {ag['bytes_executed'] / MIB:.1f}",
            "-"
            if not ag
            else f"{'/'.join(map(str, ag['repeats_as_read'])) or '-'}; {'/'.join(map(str, ag['repeats_executed'])) or '-'}",
        )
    console = Console(width=200)
    console.print(table)
    for name, s in scaling.items():
        console.print(
            f"{name}: temp bytes at m={s['m_large']} / m={s['m_small']} = {s['ratio']:.3f} "
            f"({s['temp_bytes_small'] / MIB:.2f} -> {s['temp_bytes_large'] / MIB:.2f} MiB; peak stash "
            f"{s['peak_stash_small']} -> {s['peak_stash_large']} microbatches' "
            + ("residuals)" if "residuals" in name else f"inputs of {s['stash_entry_bytes'] / KIB:.0f} KiB)")
        )


def picture(rows: list[dict[str, Any]], scaling: dict[str, Any], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    names = [r["case"] for r in rows]
    colors = ["#b0b0b0" if r["case"] == BASELINE else "#2b7bba" for r in rows]
    ypos = np.arange(len(rows))

    def bars(ax: Any, values: list[float], labels: list[str], xlabel: str, title: str, room: float = 1.5) -> None:
        drawn = ax.barh(ypos, values, color=colors)
        for bar, label in zip(drawn, labels, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {label}", va="center", fontsize=9)
        ax.set_yticks(ypos, names, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * room or 1)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(title, fontsize=10)

    ratio = [r["ratio_to_unpipelined"] for r in rows]
    bars(
        axes[0, 0],
        ratio,
        [f"{v:.2f}x ({r['ms_per_step']:.0f} ms)" for v, r in zip(ratio, rows, strict=True)],
        "step time / unpipelined step time (lower is better)",
        "step time vs the unpipelined plan (same 8 devices, same batch)",
    )
    axes[0, 0].axvline(1.0, color="#555555", lw=0.8, ls="--")
    bubble = [r["bubble"] or 0.0 for r in rows]
    bars(
        axes[0, 1],
        bubble,
        ["n/a" if r["bubble"] is None else f"{r['bubble']:.3f} (stash {r['peak_stash']})" for r in rows],
        "idle share of stage-ticks (schedule's bubble)",
        "bubble and peak stash, from the schedule",
    )
    temp = [r["temp_bytes"] / MIB for r in rows]
    bars(axes[1, 0], temp, [f"{v:.2f} MiB" for v in temp], "MiB per device", "temporary bytes per device (XLA)")
    perm = [r["permute_bytes_sent_busiest_device"] / KIB for r in rows]
    bars(
        axes[1, 1],
        perm,
        [f"{v:.0f} KiB, {r['permute_count']} permutes" for v, r in zip(perm, rows, strict=True)],
        "KiB sent per step by the busiest device",
        "collective-permute bytes per step (HLO, loop trips counted)",
        room=1.75,
    )
    notes = "; ".join(f"{k} {s['ratio']:.2f}" for k, s in scaling.items())
    fig.suptitle(
        f"Pipeline schedules, llama:tiny 8 layers fp32, p={STAGES}, m={MICROBATCHES}, {NUM_DEVICES} simulated "
        f"{device} devices\ntemporary bytes at m=16 over m=8: {notes}\n"
        "CPU devices share 2 cores: times show overhead, not overlap.",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- driver -------------------------------------------------------------------------------


def main() -> None:
    t_start = time.perf_counter()
    devices = jax.devices()
    if len(devices) < NUM_DEVICES:
        devices = jax.devices("cpu")
    if len(devices) < NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, have {len(devices)}")
    devices = devices[:NUM_DEVICES]
    device = devices[0].device_kind
    batch = make_batch(MICROBATCHES * MICRO_ROWS)

    built: dict[str, dict[str, Any]] = {BASELINE: compile_baseline(devices, batch)}
    for spec in CASES:
        built[spec["case"]] = {**compile_case(spec, devices, batch), "spec": spec}

    # Warm-up call of each (its loss checked against the baseline's), then rounds of timed calls.
    losses = {name: float(b["compiled"](*b["args"])[0]) for name, b in built.items()}
    # Many short rounds: a slow spell of the shared host falls on every case alike, and each
    # round's ratio compares cases timed seconds apart.
    samples: dict[str, list[float]] = {name: [] for name in built}
    ratios: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(ROUNDS):
        this_round = {name: statistics.median(timed(b["compiled"], b["args"], CALLS)) for name, b in built.items()}
        for name, seconds in this_round.items():
            samples[name].append(seconds)
            ratios[name].append(seconds / this_round[BASELINE])

    rows = []
    for name, b in built.items():
        schedule: Schedule | None = b.get("schedule")
        ms = statistics.median(samples[name]) * 1e3
        rows.append(
            {
                "case": name,
                "schedule": schedule.name if schedule else None,
                "mesh": b["spec"]["mesh"] if "spec" in b else {"data": NUM_DEVICES},
                "rules": b["spec"]["rules"] if "spec" in b else ({}, {"batch": "data"}),
                "microbatches": schedule.microbatches if schedule else None,
                "virtual": schedule.virtual if schedule else None,
                "ticks": schedule.ticks if schedule else None,
                "bubble": schedule.bubble if schedule else None,
                "peak_stash": schedule.peak_stash if schedule else None,
                "ms_per_step": ms,
                "samples_ms": [s * 1e3 for s in samples[name]],
                "ratio_to_unpipelined": statistics.median(ratios[name]),
                "ratio_samples": ratios[name],
                "loss": losses[name],
                "loss_rel_diff_to_unpipelined": abs(losses[name] - losses[BASELINE]) / losses[BASELINE],
                "compile_s": b["compile_s"],
                **read_program(b),
            }
        )

    # Temporary bytes at twice the microbatches, same microbatch size: the batch doubles.
    big_batch = make_batch(2 * MICROBATCHES * MICRO_ROWS, seed=1)
    by_case = {r["case"]: r for r in rows}
    stash_entry = (MICRO_ROWS // PIPE_DATA["data"]) * SEQ * CFG.d_model * np.dtype(CFG.dtype).itemsize
    scaling = {}
    for spec in SCALING:
        large = compile_case(spec, devices, big_batch)
        small = by_case[spec["base"]]
        temp = large["compiled"].memory_analysis().temp_size_in_bytes
        scaling[spec["base"]] = {
            "m_small": small["microbatches"],
            "m_large": spec["microbatches"],
            "temp_bytes_small": small["temp_bytes"],
            "temp_bytes_large": temp,
            "ratio": temp / small["temp_bytes"],
            "peak_stash_small": small["peak_stash"],
            "peak_stash_large": large["schedule"].peak_stash,
            "stash_entry_bytes": int(stash_entry),
            "compile_s": large["compile_s"],
        }

    print_table(rows, device, scaling)
    bad = [r["case"] for r in rows if r["loss_rel_diff_to_unpipelined"] > 1e-4]
    if bad:
        print(f"WARNING: loss differs from the unpipelined plan's for {bad}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if jax.default_backend() == "cpu" else device.lower().replace(" ", "-")
    result = {
        "benchmark": "pipeline",
        "device": device,
        "platform": devices[0].platform,
        "devices": NUM_DEVICES,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": {
            "model": "llama:tiny",
            "n_layers": CFG.n_layers,
            "d_model": CFG.d_model,
            "d_ff": CFG.d_ff,
            "vocab_size": CFG.vocab_size,
            "dtype": CFG.dtype,
            "stages": STAGES,
            "microbatches": MICROBATCHES,
            "microbatch_rows": MICRO_ROWS,
            "global_batch": MICROBATCHES * MICRO_ROWS,
            "seq": SEQ,
            "timing": f"{ROUNDS} rounds, each timing every case {CALLS} times (median) after a warm-up call; "
            "ms_per_step: median over rounds; ratio: median over rounds of the case's time / the baseline's "
            "in the same round",
            "host_load_average_1_5_15min_at_end": list(os.getloadavg()),
            "baseline": "jax.value_and_grad of loss_sums' mean under data=8, Rules({}, {'batch': 'data'})",
        },
        "readings": {
            "permute_count": "collective-permute executions per step: ops x enclosing loop trip counts",
            "permute_bytes": "each execution counted at its full operand size, whether or not this device sends",
            "permute_bytes_sent_busiest_device": "bytes the device that sends most puts on its links per step: "
            "only executions where it is the source of a pair to another device",
            "weight_all_gather.bytes_as_read": "all-gathers of parameters, each op x its loop trip counts, "
            "every lax.switch branch counted at every tick (an upper bound)",
            "weight_all_gather.bytes_executed": "the same with a branch's ops counted only at the ticks "
            "that run its kind (m*v per device); the last stage's head branch counted as taken",
        },
        "rows": rows,
        "temp_bytes_scaling": scaling,
        "total_seconds": time.perf_counter() - t_start,
    }
    path = out / f"pipeline-{slug}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    picture(rows, scaling, out / f"pipeline-{slug}.png", device)
    make_schedule("interleaved", STAGES, MICROBATCHES, 2).render(str(out / "pipeline-interleaved-schedule.png"))
    print(f"wrote {path.relative_to(ROOT)} and .png in {result['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
