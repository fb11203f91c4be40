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
import os
import subprocess
import sys
from typing import Any

from mlsys_jax.analysis.collectives import Collective, collectives
from mlsys_jax.analysis.cost import collective_axes
from mlsys_jax.analysis.hlo_cost import memory_traffic
from mlsys_jax.analysis.memory import PlanMemory

#: The most CPU devices a subprocess is asked to simulate.
MAX_SIMULATED = 4096
#: The note of an analysis whose collectives come from shapes.
ANALYTIC = "collectives from shapes (mlsys_jax.analysis.analytic), nothing compiled"


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
    algorithm: str = "xla"
    """``xla`` (the collective XLA emits, priced as its ring) or the ``comm.models`` algorithm a
    ``grad_sync`` runs it with (``ring``, ``halving_doubling``, ``hierarchical``,
    ``parameter_server``), priced by ``comm.models.cost``."""
    slice_size: int | None = None
    """The inner group of a ``hierarchical`` row."""

    @property
    def label(self) -> str:
        """What a view calls it: the kind, and the algorithm when it is ours."""
        return self.kind if self.algorithm == "xla" else f"{self.kind} ({self.algorithm})"

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
    bytes_per_step: float = 0.0
    """Memory traffic per step with every loop counted by its trips (``hlo_cost``); XLA's
    ``bytes_accessed`` counts a loop's body once."""


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
    activations: int
    hbm: int | None
    stage_activations: tuple[int, ...]
    compiled: Compiled | None
    collectives: tuple[CollectiveRow, ...]
    notes: tuple[str, ...] = ()
    recomputes: int = 0
    """Extra forward passes the step runs (remat, a pipeline recomputing from stashed inputs):
    each a third of the step's model FLOPs more work, not counted in MFU."""

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients and optimizer state per device, predicted from shapes."""
        return self.param_bytes + self.grad_bytes + self.opt_state_bytes

    @property
    def memory(self) -> PlanMemory:
        """The memory model's figures per device (see ``mlsys_jax.analysis.memory``)."""
        return PlanMemory(
            self.param_bytes, self.grad_bytes, self.opt_state_bytes, self.activations, self.hbm, self.stage_activations
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Analysis:
        compiled = Compiled(**data["compiled"]) if data.get("compiled") else None
        rows = tuple(
            CollectiveRow(**{**r, "axes": tuple(r["axes"]), "trip_counts": tuple(r["trip_counts"])})
            for r in data["collectives"]
        )
        return cls(
            **{
                **data,
                "compiled": compiled,
                "collectives": rows,
                "stage_activations": tuple(data["stage_activations"]),
                "notes": tuple(data.get("notes", ())),
            }
        )


def analyze(**settings: Any) -> Analysis:
    """Analyze the train step the recipe would build from these settings (the recipe's flag
    names: ``model``, ``mesh``, ``strategy``, ``batch``, ``seq``, ``microbatches``, ``schedule``,
    ``virtual_stages``, ``remat``, ``dtype``, ``attention_impl``, ...). Bad settings raise the
    recipe's errors before anything compiles."""
    from mlsys_jax.train.config import RunConfig

    cfg = RunConfig.of(**settings)
    shapes = shapes_only(cfg)  # refuses a plan that cannot work, compiling nothing
    devices = shapes.devices
    import jax

    if devices <= len(jax.devices()):
        return _analyze_here(cfg, compile_step=True)
    if devices > MAX_SIMULATED:
        note = f"{devices} devices is more than the {MAX_SIMULATED} CPU devices that can be simulated"
        return dataclasses.replace(shapes, notes=(*shapes.notes, note))
    return _analyze_in_subprocess(settings, devices)


def shapes_only(cfg: Any) -> Analysis:
    """The analysis from shapes alone (``RunConfig`` settings): memory, FLOPs, the bubble and the
    collectives the step would run (``mlsys_jax.analysis.analytic``), nothing compiled."""
    return _analyze_here(cfg, compile_step=False)


def analysis_of(
    cfg: Any,
    parts: Any,
    memory: PlanMemory,
    compiled: Compiled | None,
    rows: tuple[CollectiveRow, ...],
    notes: tuple[str, ...] = (),
    hardware: str | None = None,
) -> Analysis:
    """The ``Analysis`` of a run's settings ``cfg`` and its ``PlanParts``, from the memory
    model's figures, the compiled step's (None from shapes alone) and its collectives."""
    from mlsys_jax.analysis.analytic import forward_recomputes

    d, plan, schedule = cfg.data, parts.plan, parts.schedule
    return Analysis(
        model=cfg.model.model,
        mesh=dict(plan.axis_sizes),
        strategy=plan.rules.name,
        batch=d.batch,
        seq=d.seq,
        microbatches=d.microbatches,
        schedule=schedule.name if schedule is not None else None,
        devices=plan.num_devices,
        hardware=hardware if hardware is not None else cfg.mesh.mesh if parts.preset is not None else None,
        flops_per_token=float(parts.model.flops_per_token(d.seq)),
        bubble=schedule.bubble if schedule is not None else 0.0,
        param_bytes=memory.params,
        grad_bytes=memory.grads,
        opt_state_bytes=memory.opt_state,
        activations=memory.activations,
        hbm=memory.hbm,
        stage_activations=memory.stages,
        compiled=compiled,
        collectives=rows,
        notes=(*memory.notes, *notes),
        recomputes=forward_recomputes(schedule, cfg.model.remat != "none", cfg.mesh.pipeline_stash),
    )


def _analyze_here(cfg: Any, compile_step: bool) -> Analysis:
    import time

    from mlsys_jax.analysis.analytic import collectives_of
    from mlsys_jax.analysis.memory import memory_of
    from mlsys_jax.analysis.parts import plan_parts, train_step_of

    parts = plan_parts(cfg, concrete=compile_step)
    d, plan = cfg.data, parts.plan
    mem = memory_of(cfg, parts)
    if not compile_step:
        from mlsys_jax.parallel.errors import PlanError

        try:
            rows, note = collectives_of(cfg, parts=parts), ANALYTIC
        except PlanError as err:  # a family whose shapes the analytic model does not know
            rows, note = (), f"no collectives from shapes ({err}); compile the step (--compile) to read them"
        return analysis_of(cfg, parts, mem, None, rows, (note,))
    step = train_step_of(cfg, parts)
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
    text = exe.as_text() or ""
    compiled = dataclasses.replace(compiled, bytes_per_step=memory_traffic(text).per_step)
    rows = tuple(CollectiveRow.of(c, plan.axis_sizes) for c in collectives(text))
    return analysis_of(cfg, parts, mem, compiled, rows)


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
