"""Per-strategy memory and communication of the train step on 8 devices, against the ideal.

For dp, fsdp, tp, fsdp_tp and dp_fsdp_tp this compiles (ahead of time, no arrays) the train
step and the state initializer of a few-million-parameter Llama, then reports:

(a) bytes of params + optimizer state per device, from the compiled init's output buffers,
    against the ideal: each state leaf divided by the devices its parameter's logical axes are
    sharded over under the strategy's rules (norms cannot be split by tensor parallelism);
(b) collectives per step read from the compiled step's HLO (loops counted per iteration), as
    compiled and under the accelerator reading of ``mlsys_jax.analysis`` (all-reduce + slice read as
    a reduce-scatter, CPU-widened bf16 read as bf16), against the strategy's analytic minimum
    (``MINIMUM_IN_WORDS``: bf16 gradients but the embedding's fp32, ZeRO-3 gathers for FSDP,
    Megatron all-reduces for TP);
(c) the alpha-beta time of those collectives on a real machine's links.

Run from the repository root: ``python bench/strategies.py`` (writes bench/results/strategies.json).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)  # only the CPU backend reads this

import optax

import mlsys_jax as mj
from mlsys_jax import analysis, train
from mlsys_jax.analysis import Collective
from mlsys_jax.models import build_model
from mlsys_jax.params import is_spec, spec_leaves

OUT = ROOT / "bench" / "results" / "strategies.json"
NUM_DEVICES = 8
BATCH, SEQ = 16, 128
PRESET = "gpu-h100x8"

#: Strategy -> mesh axis sizes on 8 devices.
STRATEGIES: dict[str, dict[str, int]] = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "tp": {"tensor": 8},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}

#: ~5.2M parameters; heads, kv heads, d_ff and vocab all divide 8: a Llama preset resized.
MODEL_NAME = "llama:tiny"
MODEL = {"vocab_size": 2048, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 8, "head_dim": 32, "d_ff": 1024}

#: Ring traffic per device per step (bytes, as compiled and under the reading) that this script
#: measured on jax 0.10.2 before the model was split into embed / block / head pieces. A change
#: that moves more than this is a regression: the table flags it and the JSON records it.
FROZEN_TRAFFIC = {
    "dp": (36_716_302, 20_201_230),
    "fsdp": (69_762_742, 26_627_510),
    "tp": (66_117_758, 33_087_614),
    "fsdp_tp": (40_144_100, 16_540_388),
    "dp_fsdp_tp": (35_158_708, 16_019_636),
}

MINIMUM_IN_WORDS = {
    "gradients": "the step computes each matmul weight's gradient in the compute dtype (bf16) "
    "and reduces it across devices in that dtype, and adds the embedding's "
    "gradient up (and reduces it) in fp32 because a frequent token's row sums "
    "thousands of them; G_t below is those bytes of each parameter's tensor shard",
    "data": "all-reduce over data of the gradients each device holds after any fsdp "
    "scatter (G_t / n_fsdp), ring traffic 2(n-1)/n per byte",
    "fsdp": "ZeRO-3: all-gather over fsdp of every parameter's tensor shard in the compute "
    "dtype (bf16, W_t) for the forward pass and again for the backward pass (gathered "
    "weights are not kept between the passes: that is what keeps FSDP's memory at "
    "1/n), plus reduce-scatter over fsdp of the gradients (G_t), ring traffic "
    "(n-1)/n per byte; 'single-gather bound' also reports the ratio against a schedule "
    "that keeps the forward gathers",
    "tensor": "Megatron tensor parallelism: per layer two forward all-reduces (attention "
    "output, MLP down-projection) and two backward all-reduces (input gradients of "
    "the QKV and gate/up projections) of the bf16 activations (batch/n_batch, seq, "
    "d_model), plus the vocab-sharded embedding lookup (forward) and LM-head input "
    "gradient (backward), plus three fp32 (batch, seq) reductions for the "
    "vocab-sharded softmax and target logit; ring traffic 2(n-1)/n per byte",
}


# jaxlib ships no type stubs, so a checker sees jax.Device as an unknown variable.
def bench_devices() -> list[jax.Device]:  # pyright: ignore[reportInvalidTypeForm]
    devs = jax.devices()
    if len(devs) < NUM_DEVICES:
        devs = jax.devices("cpu")
    if len(devs) < NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, have {len(devs)}")
    return devs[:NUM_DEVICES]


# ---- (a) memory ---------------------------------------------------------------------------


def shards_by_path(plan: mj.Plan, specs: Any) -> dict[str, int]:
    """How many devices the plan splits each parameter over."""
    return {p.path: math.prod(p.shape) // math.prod(p.shard_shape) for p in plan.placements(specs)}


def memory(plan: mj.Plan, specs: Any, opt: optax.GradientTransformation, compiled_init: Any) -> dict[str, Any]:
    """Measured per-device state bytes against the ideal for the strategy's rules."""
    by_path = shards_by_path(plan, specs)
    treedef = jax.tree_util.tree_structure(specs, is_leaf=is_spec)
    shards = jax.tree_util.tree_unflatten(treedef, [by_path[p] for p, _ in spec_leaves(specs)])
    abstract = train.abstract_state(plan, specs, opt)
    abstract_opt = jax.eval_shape(
        opt.init, jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)
    )
    opt_shards = optax.tree_map_params(
        opt,
        lambda _, n: n,
        abstract_opt,
        shards,
        transform_non_params=lambda _: 1,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    shard_state = train.TrainState(step=1, params=shards, opt_state=opt_shards, rng=1)
    leaves = jax.tree_util.tree_leaves(abstract)
    counts = jax.tree_util.tree_leaves(shard_state)
    assert len(leaves) == len(counts)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    ideal = sum(x.size * x.dtype.itemsize / n for x, n in zip(leaves, counts))
    measured = compiled_init.memory_analysis().output_size_in_bytes
    unsplit = sum(s.nbytes for path, s in spec_leaves(specs) if by_path[path] == 1)
    return {
        "state_bytes_total": total,
        "per_device_measured": measured,
        "per_device_ideal": ideal,
        "ratio": measured / ideal,
        "per_device_if_everything_split_8_ways": total / NUM_DEVICES,
        "unsplit_param_bytes": unsplit,
    }


# ---- (b) collectives ----------------------------------------------------------------------


def model_bytes(specs: Any, plan: mj.Plan, itemsize: Callable[[str], int]) -> float:
    """Bytes of every parameter's tensor-parallel shard, ``itemsize(path)`` bytes per element
    (what one device gathers or reduces over the other axes)."""
    only_tensor = plan.rules.override(params={k: None for k, v in plan.rules.params if v != "tensor"})
    shards = shards_by_path(mj.Plan(plan.mesh, only_tensor), specs)
    return sum(s.size * itemsize(path) / shards[path] for path, s in spec_leaves(specs))


def weight_itemsize(path: str) -> int:
    """Weights are gathered in the compute dtype (bf16)."""
    return 2


def grad_itemsize(path: str) -> int:
    """Gradients come out of bf16 matmuls in bf16; the embedding's is added up row by row in
    fp32 (``models.layers.embedding_lookup``)."""
    return 4 if path == "embed" else 2


def minimum(cfg: Any, specs: Any, plan: mj.Plan) -> list[dict[str, Any]]:
    """The strategy's analytic minimum, one entry per (kind, mesh axes)."""
    sizes = plan.axis_sizes
    nd, nf, nt = sizes.get("data", 1), sizes.get("fsdp", 1), sizes.get("tensor", 1)
    w_t = model_bytes(specs, plan, weight_itemsize)
    g_t = model_bytes(specs, plan, grad_itemsize)
    out = []

    def add(kind: str, axis: str, n: int, payload: float, what: str) -> None:
        out.append(
            {
                "kind": kind,
                "axes": [axis],
                "payload_bytes": payload,
                "traffic_bytes": analysis.ring_traffic(kind, payload, n),
                "what": what,
            }
        )

    if nf > 1:
        add(
            "all-gather",
            "fsdp",
            nf,
            2 * w_t,
            "all-gather of bf16 parameters for the forward and again for the backward pass",
        )
        add("reduce-scatter", "fsdp", nf, g_t, "reduce-scatter of gradients")
    if nd > 1:
        add("all-reduce", "data", nd, g_t / nf, "all-reduce of gradients (fsdp shard)")
    if nt > 1:
        b_loc = BATCH // (nd * nf)
        act = b_loc * SEQ * cfg.d_model * 2
        n_act = 4 * cfg.n_layers + 2
        add(
            "all-reduce",
            "tensor",
            nt,
            n_act * act + 3 * b_loc * SEQ * 4,
            f"{n_act} bf16 activation all-reduces + 3 fp32 softmax reductions",
        )
    return out


def category(c: Collective, sizes: dict[str, int]) -> tuple[str, tuple[str, ...]]:
    return c.kind, analysis.collective_axes(c, sizes)


def is_backward(c: Collective) -> bool:
    return "transpose(" in c.op_name


def describe(c: Collective, sizes: dict[str, int]) -> dict[str, Any]:
    return {
        "op": c.name,
        "kind": c.kind,
        "axes": list(analysis.collective_axes(c, sizes)),
        "dtypes": sorted(set(c.dtypes)),
        "elements": len(c.shapes),
        "shapes": [list(s) for s in c.shapes][:6],
        "count": c.count,
        "traffic_bytes_per_step": c.total_traffic_bytes,
        "inferred": c.inferred,
        "source": c.op_name[-110:],
    }


def notes(raw: list[Collective], reading: list[Collective], cfg: Any, sizes: dict[str, int]) -> list[str]:
    """Why the program moves more (or less) than the minimum, found in the HLO."""
    out = []
    nd, nf = sizes.get("data", 1), sizes.get("fsdp", 1)
    act_elems = (BATCH // (nd * nf)) * SEQ * cfg.d_model
    regather = [c for c in reading if c.kind == "all-gather" and is_backward(c)]
    if regather:
        b = sum(c.total_payload_bytes for c in regather)
        out.append(
            f"backward re-gathers parameters (ZeRO-3 style): {len(regather)} all-gather "
            f"ops in the backward pass, {b} payload bytes per step"
        )
    f32_grads = [
        c
        for c in reading
        if c.kind in ("reduce-scatter", "all-reduce")
        and is_backward(c)
        and any(d == "f32" and math.prod(sh) >= 1024 for d, sh in zip(c.dtypes, c.shapes))
    ]
    for c in f32_grads:
        big = [list(sh) for d, sh in zip(c.dtypes, c.shapes) if d == "f32" and math.prod(sh) >= 1024]
        out.append(
            f"{c.name}: gradient(s) {big} reduced in f32 (the minimum counts f32 only "
            f"for the embedding's) "
            f"(x{c.count}; source {c.op_name[-60:]})"
        )
    f32_gathers = [
        c for c in reading if c.kind == "all-gather" and "f32" in c.dtypes and math.prod(c.shapes[0]) >= 1024
    ]
    for c in f32_gathers:
        out.append(
            f"{c.name}: all-gather of {list(c.shapes[0])} stays f32 in the program (the "
            f"parameter is gathered before its cast to bf16; source {c.op_name[-60:]})"
        )
    for c in reading:
        act = [d for s, d in zip(c.shapes, c.dtypes) if math.prod(s) == act_elems]
        axes = analysis.collective_axes(c, sizes)
        if c.kind == "all-reduce" and axes == ("tensor",) and is_backward(c) and len(act) > 1:
            out.append(
                f"{c.name}: one all-reduce per projection input gradient ({len(act)} "
                f"activation-sized elements, x{c.count}) where one all-reduce of their "
                f"sum would do (source {c.op_name[-60:]})"
            )
        if c.kind == "all-reduce" and axes == ("tensor",) and "f32" in act:
            out.append(
                f"{c.name}: activation all-reduce in f32 ({act.count('f32')} "
                f"element(s), x{c.count}; source {c.op_name[-60:]})"
            )
    bf16_grads = [
        c
        for c in reading
        if c.kind in ("reduce-scatter", "all-reduce")
        and "bf16" in c.dtypes
        and analysis.collective_axes(c, sizes)
        and set(analysis.collective_axes(c, sizes)) <= {"data", "fsdp"}
    ]
    if bf16_grads:
        b = sum(c.total_payload_bytes for c in bf16_grads)
        out.append(
            f"gradients are reduced across devices in bf16, the compute dtype "
            f"({len(bf16_grads)} ops, {b} payload bytes per step), as the minimum assumes"
        )
    wide = [c for c in raw if any(c.program_dtypes)]
    if wide:
        out.append(
            f"XLA:CPU widened {len(wide)} bf16 collectives to f32 (no bf16 collectives "
            "on CPU); the reading counts them in bf16"
        )
    sliced = [c for c in raw if any(c.sliced)]
    if sliced:
        out.append(
            f"XLA:CPU left {len(sliced)} all-reduce(s) followed by a dynamic-slice of "
            "this device's shard; the reading counts them as reduce-scatters"
        )
    return out


def collectives(compiled_step: Any, cfg: Any, specs: Any, plan: mj.Plan, link_of: analysis.LinkOf) -> dict[str, Any]:
    raw = list(analysis.collectives(compiled_step.as_text()))
    reading = analysis.readings(raw, as_reduce_scatter=True, program_dtypes=True)
    sizes = plan.axis_sizes
    mins = minimum(cfg, specs, plan)
    min_traffic = sum(m["traffic_bytes"] for m in mins)
    cats: dict[tuple, dict[str, Any]] = {}
    for label, items in (("as_compiled", raw), ("reading", reading)):
        for c in items:
            kind, axes = category(c, sizes)
            row = cats.setdefault((kind, axes), {"kind": kind, "axes": list(axes)})
            row[f"{label}_ops"] = row.get(f"{label}_ops", 0) + 1
            row[f"{label}_traffic_bytes"] = row.get(f"{label}_traffic_bytes", 0) + c.total_traffic_bytes
    for m in mins:
        row = cats.setdefault((m["kind"], tuple(m["axes"])), {"kind": m["kind"], "axes": m["axes"]})
        row["minimum_traffic_bytes"] = m["traffic_bytes"]
    for row in cats.values():
        for k in (
            "as_compiled_ops",
            "as_compiled_traffic_bytes",
            "reading_ops",
            "reading_traffic_bytes",
            "minimum_traffic_bytes",
        ):
            row.setdefault(k, 0)
        row["ratio_reading"] = (
            row["reading_traffic_bytes"] / row["minimum_traffic_bytes"] if row["minimum_traffic_bytes"] else None
        )
    raw_traffic = sum(c.total_traffic_bytes for c in raw)
    read_traffic = sum(c.total_traffic_bytes for c in reading)
    regather = sum(c.total_traffic_bytes for c in reading if c.kind == "all-gather" and is_backward(c))
    excess = []
    for (kind, axes), row in cats.items():
        if row["reading_traffic_bytes"] > 1.1 * row["minimum_traffic_bytes"] + 1024:
            mine = [c for c in reading if category(c, sizes) == (kind, axes)]
            mine.sort(key=lambda c: -c.total_traffic_bytes)
            excess.extend(describe(c, sizes) for c in mine[:8])
    return {
        "as_compiled": {k: vars(v) for k, v in analysis.summarize(raw).items() if v.ops},
        "reading": {k: vars(v) for k, v in analysis.summarize(reading).items() if v.ops},
        "by_category": sorted(cats.values(), key=lambda r: (r["kind"], r["axes"])),
        "minimum": mins,
        "traffic_bytes_as_compiled": raw_traffic,
        "traffic_bytes_reading": read_traffic,
        "traffic_bytes_minimum": min_traffic,
        "ratio_as_compiled": raw_traffic / min_traffic,
        "ratio_reading": read_traffic / min_traffic,
        "backward_regather_traffic_bytes": regather,
        "ratio_reading_vs_single_gather_bound": read_traffic
        / (min_traffic - sum(m["traffic_bytes"] / 2 for m in mins if m["kind"] == "all-gather")),
        "all_counts_exact": all(c.exact for c in raw),
        "alpha_beta_seconds": {
            "as_compiled": analysis.total_time(raw, link_of),
            "reading": analysis.total_time(reading, link_of),
            "minimum": sum(
                analysis.collective_time(_as_collective(m, sizes), link_of(_as_collective(m, sizes))) for m in mins
            ),
        },
        "excess_ops": excess,
        "notes": notes(raw, reading, cfg, sizes),
    }


def _as_collective(m: dict[str, Any], sizes: dict[str, int]) -> Collective:
    n = math.prod(sizes[a] for a in m["axes"])
    b = int(m["payload_bytes"])
    return Collective(
        name=m["what"],
        kind=m["kind"],
        dtypes=(),
        shapes=(),
        operand_bytes=b,
        result_bytes=b,
        element_bytes=(b,),
        group_size=n,
    )


# ---- driver -------------------------------------------------------------------------------


def run_strategy(name: str, axes: dict[str, int], devices: list, cfg: Any) -> dict[str, Any]:
    mesh = mj.make_mesh(axes, devices=devices)
    plan = mj.Plan(mesh, mj.rules(name))
    model = build_model(MODEL_NAME, **MODEL)
    opt = train.adamw(train.OptimConfig(), model.specs)
    t0 = time.perf_counter()
    step = train.make_train_step(model, plan, opt)
    compiled_step = step.lower(BATCH, SEQ).compile()
    t1 = time.perf_counter()
    init = train.make_init(plan, model.specs, opt)
    compiled_init = init.lower(jax.random.PRNGKey(0)).compile()
    t2 = time.perf_counter()
    sizes = dict(mesh.shape)
    preset = mj.load_preset(PRESET)
    link = next(iter(preset.links.values()))
    link_of = analysis.preset_links(preset, sizes, default=link)
    found = collectives(compiled_step, cfg, model.specs, plan, link_of)
    frozen_compiled, frozen_reading = FROZEN_TRAFFIC[name]
    found["frozen_traffic_bytes"] = {"as_compiled": frozen_compiled, "reading": frozen_reading}
    found["reading_vs_frozen"] = found["traffic_bytes_reading"] / frozen_reading
    found["within_frozen"] = (
        found["traffic_bytes_as_compiled"] <= frozen_compiled and found["traffic_bytes_reading"] <= frozen_reading
    )
    return {
        "mesh": {k: v for k, v in sizes.items() if v > 1},
        "compile_seconds": {"train_step": t1 - t0, "init": t2 - t1},
        "memory": memory(plan, model.specs, opt, compiled_init),
        "collectives": found,
    }


def table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mem = Table(title="(a) params + optimizer state per device")
    for col in ("strategy", "mesh", "measured MiB", "ideal MiB", "ratio", "unsplit params KiB"):
        mem.add_column(col, justify="right")
    com = Table(title=f"(b, c) collectives per step (traffic per device, ring model; alpha-beta on {PRESET})")
    for col in (
        "strategy",
        "ops as compiled",
        "MiB as compiled",
        "MiB reading",
        "MiB minimum",
        "ratio compiled",
        "ratio reading",
        "reading / frozen",
        "re-gather MiB",
        "t reading us",
        "t minimum us",
    ):
        com.add_column(col, justify="right")
    mib = 1 << 20
    for name, r in results.items():
        m, c = r["memory"], r["collectives"]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        mem.add_row(
            name,
            mesh,
            f"{m['per_device_measured'] / mib:.3f}",
            f"{m['per_device_ideal'] / mib:.3f}",
            f"{m['ratio']:.3f}",
            f"{m['unsplit_param_bytes'] / 1024:.1f}",
        )
        ops = sum(v["ops"] for v in c["as_compiled"].values())
        com.add_row(
            name,
            str(ops),
            f"{c['traffic_bytes_as_compiled'] / mib:.2f}",
            f"{c['traffic_bytes_reading'] / mib:.2f}",
            f"{c['traffic_bytes_minimum'] / mib:.2f}",
            f"{c['ratio_as_compiled']:.2f}",
            f"{c['ratio_reading']:.2f}",
            f"{c['reading_vs_frozen']:.3f}",
            f"{c['backward_regather_traffic_bytes'] / mib:.2f}",
            f"{c['alpha_beta_seconds']['reading'] * 1e6:.0f}",
            f"{c['alpha_beta_seconds']['minimum'] * 1e6:.0f}",
        )
    cat = Table(title="(b) traffic per device per step by collective and mesh axes (MiB)")
    for col in ("strategy", "collective", "axes", "ops", "as compiled", "reading", "minimum", "reading / minimum"):
        cat.add_column(col, justify="right")
    for name, r in results.items():
        for row in r["collectives"]["by_category"]:
            if max(row["reading_traffic_bytes"], row["minimum_traffic_bytes"]) < 1024:
                continue
            ratio = row["ratio_reading"]
            cat.add_row(
                name,
                row["kind"],
                ",".join(row["axes"]),
                str(row["as_compiled_ops"]),
                f"{row['as_compiled_traffic_bytes'] / mib:.2f}",
                f"{row['reading_traffic_bytes'] / mib:.2f}",
                f"{row['minimum_traffic_bytes'] / mib:.2f}",
                "-" if ratio is None else f"{ratio:.2f}",
            )
    console = Console(width=160)
    console.print(mem)
    console.print(com)
    console.print(cat)
    for name, r in results.items():
        if not r["collectives"]["within_frozen"]:
            console.print(f"[bold red]{name}: moves more than the frozen figures {FROZEN_TRAFFIC[name]}")
        for note in r["collectives"]["notes"]:
            console.print(f"[bold]{name}[/bold]: {note}")


def main() -> None:
    devices = bench_devices()
    model = build_model(MODEL_NAME, **MODEL)
    cfg, n_params = model.config, mj.count_params(model.specs)
    results = {}
    t0 = time.perf_counter()
    for name, axes in STRATEGIES.items():
        results[name] = run_strategy(name, axes, devices, cfg)
    preset = mj.load_preset(PRESET)
    out = {
        "jax_version": jax.__version__,
        "backend": devices[0].platform,
        "num_devices": len(devices),
        "python": platform.python_version(),
        "model": {**{k: getattr(cfg, k) for k in (*MODEL, "dtype", "param_dtype", "remat")}, "params": n_params},
        "batch_size": BATCH,
        "seq_len": SEQ,
        "alpha_beta_links": {
            "preset": PRESET,
            "links": {k: vars(v) for k, v in preset.links.items()},
            "axes_not_in_preset": "charged at the preset's one link",
            "minimum_time": "each component of the minimum is charged as one collective (its latency paid once)",
        },
        "minimum_in_words": MINIMUM_IN_WORDS,
        "readings": {
            "as_compiled": "collectives exactly as XLA compiled them for this backend",
            "reading": "as compiled, but an all-reduce only used through a slice of this "
            "device's 1/n shard counts as a reduce-scatter, and collectives the CPU "
            "backend widened from bf16 count in bf16 (what a GPU/TPU backend would "
            "run; inferred, see mlsys_jax.analysis)",
        },
        "targets": {"fsdp_memory_ratio_max": 1.10, "collective_ratio_max": 1.10},
        "strategies": results,
        "total_seconds": time.perf_counter() - t0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2, default=float) + "\n")
    table(results)
    print(f"wrote {OUT.relative_to(ROOT)} in {out['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
