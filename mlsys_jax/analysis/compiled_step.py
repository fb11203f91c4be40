"""Analyze a training plan without paying for it: the real train step compiled ahead of time from
``ShapeDtypeStruct``s on simulated CPU devices, with its memory and cost analyses and every
collective it runs, beside the state bytes the plan predicts from shapes alone.

A mesh larger than this process's devices is compiled in a subprocess that simulates as many CPU
devices as the mesh has (up to ``MAX_SIMULATED``, about what the CPU backend accepts); beyond that
the analysis is analytic only and says so in its notes. The compiled figures are XLA:CPU's: its
temporaries are not what a GPU or TPU compiler would schedule, and its collectives are read as
compiled (see ``mlsys_jax.analysis.cpu_readings`` for the accelerator readings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Any

from mlsys_jax.analysis.collectives import Collective, collectives
from mlsys_jax.analysis.cost import collective_axes

#: The most CPU devices a subprocess is asked to simulate.
MAX_SIMULATED = 4096


@dataclasses.dataclass(frozen=True)
class CollectiveRow:
    """One collective of the compiled step: what it moves, over which mesh axes, how often."""

    kind: str
    dtype: str
    payload_bytes: int
    axes: tuple[str, ...]
    count: int
    trip_counts: tuple[int | None, ...]
    group_size: int = 1
    traffic_bytes: float = 0.0

    @classmethod
    def of(cls, c: Collective, axis_sizes: dict[str, int]) -> CollectiveRow:
        axes = collective_axes(c, axis_sizes)
        return cls(c.kind, c.dtype, c.payload_bytes, axes, c.count, c.trip_counts, c.group_size, c.traffic_bytes)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What XLA reports for the compiled step, per device."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A plan's figures per device: the predicted state bytes (from shapes) and, when the step
    could be compiled here, what the compiled step holds, computes and communicates."""

    model: str
    mesh: dict[str, int]
    strategy: str
    batch: int
    seq: int
    microbatches: int
    schedule: str | None
    devices: int
    hardware: str | None
    flops_per_token: float
    bubble: float
    param_bytes: int
    grad_bytes: int
    opt_state_bytes: int
    activation_estimate: int | None
    activations: int | None
    compiled: Compiled | None
    collectives: tuple[CollectiveRow, ...]
    notes: tuple[str, ...] = ()

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state per device, predicted from shapes."""
        return self.param_bytes + self.grad_bytes + self.opt_state_bytes

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Analysis:
        compiled = Compiled(**data["compiled"]) if data.get("compiled") else None
        rows = tuple(
            CollectiveRow(**{**r, "axes": tuple(r["axes"]), "trip_counts": tuple(r["trip_counts"])})
            for r in data["collectives"]
        )
        return cls(**{**data, "compiled": compiled, "collectives": rows, "notes": tuple(data.get("notes", ()))})


def analyze(**settings: Any) -> Analysis:
    """Analyze the train step the recipe would build from these settings (the recipe's flag
    names: ``model``, ``mesh``, ``strategy``, ``batch``, ``seq``, ``microbatches``, ``schedule``,
    ``virtual_stages``, ``remat``, ``dtype``, ``attention_impl``, ...). Bad settings raise the
    recipe's errors before anything compiles."""
    from mlsys_jax.mesh import MeshError
    from mlsys_jax.parallel import resolve_mesh
    from mlsys_jax.train.config import RunConfig

    cfg = RunConfig.of(**settings)
    _, sizes, _ = resolve_mesh(cfg.mesh.mesh, cfg.mesh.strategy, cfg.mesh.sequence_parallel)
    if -1 in sizes.values():
        raise MeshError(
            f"--mesh {cfg.mesh.mesh!r}: an axis of -1 ('the rest') has no size without devices. Fix: give every "
            "axis a size to analyze a plan."
        )
    shapes_only = _analyze_here(cfg, compile_step=False)  # refuses a plan that cannot work, compiling nothing
    devices = math.prod(sizes.values())
    import jax

    if devices <= len(jax.devices()):
        return _analyze_here(cfg, compile_step=True)
    if devices > MAX_SIMULATED:
        note = (
            f"{devices} devices is more than the {MAX_SIMULATED} CPU devices that can be simulated: "
            "predicted from shapes only, nothing compiled"
        )
        return dataclasses.replace(shapes_only, notes=(*shapes_only.notes, note))
    return _analyze_in_subprocess(settings, devices)


def _analyze_here(cfg: Any, compile_step: bool) -> Analysis:
    import time

    import jax

    from mlsys_jax.analysis.activations import activation_memory
    from mlsys_jax.mesh import abstract_mesh, make_mesh
    from mlsys_jax.models import registry
    from mlsys_jax.parallel import Plan, resolve_mesh, rules
    from mlsys_jax.parallel.memory import memory_per_device
    from mlsys_jax.train.config import model_overrides
    from mlsys_jax.train.optim import OptimConfig, adamw
    from mlsys_jax.train.setup import pipeline_schedule
    from mlsys_jax.train.step import check_batch, make_train_step

    preset, sizes, strategy = resolve_mesh(cfg.mesh.mesh, cfg.mesh.strategy, cfg.mesh.sequence_parallel)
    model = registry.build_model(cfg.model.model, **model_overrides(cfg))
    layout = preset if preset is not None else sizes
    wanted = math.prod(sizes.values())
    mesh = make_mesh(layout, devices=jax.devices()[:wanted]) if compile_step else abstract_mesh(layout)
    plan = Plan(mesh, rules(strategy, sequence_parallel=cfg.mesh.sequence_parallel))
    d = cfg.data
    check_batch(plan, d.batch, d.microbatches)
    schedule = pipeline_schedule(cfg, plan.axis_sizes.get("pipeline", 1), strategy, model)
    optimizer = adamw(OptimConfig(lr=cfg.optimizer.lr, warmup_steps=cfg.optimizer.warmup), model.specs)
    mem = memory_per_device(plan, model, optimizer, d.batch, d.seq, d.microbatches)
    activations, notes = None, []
    if schedule is not None:
        notes.append("activations of a pipeline's stash are not modelled yet")
    else:
        local_rows = d.batch // (plan.batch_shards * d.microbatches)
        activations = activation_memory(model, local_rows, d.seq).total
        split = [a for a in ("tensor", "sequence") if plan.axis_sizes.get(a, 1) > 1]
        if split:
            notes.append(f"activations modelled whole per token, not split over {' and '.join(split)}")
    compiled, rows = None, ()
    if compile_step:
        step = make_train_step(
            model,
            plan,
            optimizer,
            microbatches=d.microbatches,
            schedule=schedule,
            pipeline_stash=cfg.mesh.pipeline_stash,
            pipeline_weights=cfg.mesh.pipeline_weights,
        )
        t0 = time.perf_counter()
        exe = step.lower(d.batch, d.seq).compile()
        seconds = time.perf_counter() - t0
        memory, cost = exe.memory_analysis(), _cost(exe)
        compiled = Compiled(
            argument_bytes=int(memory.argument_size_in_bytes) if memory else 0,
            output_bytes=int(memory.output_size_in_bytes) if memory else 0,
            temp_bytes=int(memory.temp_size_in_bytes) if memory else 0,
            code_bytes=int(memory.generated_code_size_in_bytes) if memory else 0,
            flops=float(cost.get("flops", 0.0)),
            bytes_accessed=float(cost.get("bytes accessed", 0.0)),
            compile_seconds=seconds,
        )
        rows = tuple(CollectiveRow.of(c, plan.axis_sizes) for c in collectives(exe.as_text() or ""))
    return Analysis(
        model=cfg.model.model,
        mesh=dict(plan.axis_sizes),
        strategy=plan.rules.name,
        batch=d.batch,
        seq=d.seq,
        microbatches=d.microbatches,
        schedule=schedule.name if schedule is not None else None,
        devices=plan.num_devices,
        hardware=cfg.mesh.mesh if preset is not None else None,
        flops_per_token=float(model.flops_per_token(d.seq)),
        bubble=schedule.bubble if schedule is not None else 0.0,
        param_bytes=mem.params,
        grad_bytes=mem.grads,
        opt_state_bytes=mem.opt_state,
        activation_estimate=mem.activations,
        activations=activations,
        compiled=compiled,
        collectives=rows,
        notes=tuple(notes),
    )


def _cost(exe: Any) -> dict[str, float]:
    """The compiled step's cost analysis as one dict (older JAX returns a list of them)."""
    cost = exe.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _analyze_in_subprocess(settings: dict[str, Any], devices: int) -> Analysis:
    """Run ``analyze`` in a fresh Python that simulates ``devices`` CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = subprocess.run(
        [sys.executable, "-m", "mlsys_jax.analysis.compiled_step", json.dumps(settings)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"analyzing the plan on {devices} simulated devices failed: {last}")
    return Analysis.from_json(json.loads(out.stdout.strip().splitlines()[-1]))


def _main() -> None:
    settings = json.loads(sys.argv[1])
    print(json.dumps(analyze(**settings).to_json()))


if __name__ == "__main__":
    _main()
