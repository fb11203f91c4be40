"""One plan's report, as data every view renders (terminal, HTML, JSON): where each parameter
lives (and which shard each device holds), the memory per device with its verdict and fix, the
collectives a step runs with their predicted time, the predicted step, and the pipeline."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mlsys_jax.analysis.compiled_step import Analysis, Compiled
from mlsys_jax.analysis.memory import PlanMemory, fit_fix
from mlsys_jax.analysis.prediction import Prediction, predict, row_time
from mlsys_jax.parallel.plan import Placement


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter: its shape and logical axes, the mesh axes each dim is split over, its bytes
    per device, and ``shards[d]``: which shard device ``d`` (row-major over the mesh) holds."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    logical_axes: tuple[str | None, ...]
    spec: tuple[tuple[str, ...], ...]
    bytes_per_device: int
    shards: tuple[int, ...]

    @property
    def placement(self) -> str:
        """``fsdp, tensor·`` style: each dim's mesh axes, ``·`` for a whole dim."""
        dims = ["×".join(axes) if axes else "·" for axes in self.spec]
        return ", ".join(dims) if any(self.spec) else "replicated"


@dataclasses.dataclass(frozen=True)
class CollectiveLine:
    """Collectives of one kind, dtype and set of mesh axes: ops in the program, executions per
    step, bytes per step, and the predicted seconds per step on the plan's hardware."""

    kind: str
    dtype: str
    axes: tuple[str, ...]
    ops: int
    runs: int
    bytes_per_step: int
    seconds_per_step: float | None


@dataclasses.dataclass(frozen=True)
class PipelineView:
    """A pipeline schedule as cells: ``grid[stage][tick]`` is ``F3``, ``B3`` or ``W3`` with the
    chunk after a dot when interleaved (``F3.1``), or ``""`` for an idle tick."""

    name: str
    stages: int
    microbatches: int
    virtual: int
    bubble: float
    peak_stash: int
    grid: tuple[tuple[str, ...], ...]
    stage_activations: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """Everything ``mlsys-jax plan`` shows about one plan."""

    model: str
    parameters: int
    strategy: str
    mesh_label: str
    mesh: dict[str, int]
    hardware: str | None
    device_kind: str | None
    batch: int
    seq: int
    microbatches: int
    params: tuple[ParamRow, ...]
    memory: PlanMemory
    fix: str | None
    compiled: Compiled | None
    collectives: tuple[CollectiveLine, ...]
    prediction: Prediction | None
    pipeline: PipelineView | None
    notes: tuple[str, ...]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    def to_json(self) -> dict[str, Any]:
        """Plain data: every field, and the prediction's derived figures."""
        out = dataclasses.asdict(self)
        out["memory"] |= {"state": self.memory.state, "total": self.memory.total, "fits": self.memory.fits}
        p = self.prediction
        if p is not None:
            out["prediction"] |= {
                "serial_s": p.serial_s,
                "overlapped_s": p.overlapped_s,
                "mfu": p.mfu(),
                "mfu_overlapped": p.mfu(overlapped=True),
                "tokens_per_s": p.tokens_per_s(),
                "tokens_per_s_overlapped": p.tokens_per_s(overlapped=True),
            }
        return out


def shard_ids(spec: tuple[tuple[str, ...], ...], mesh: dict[str, int]) -> tuple[int, ...]:
    """For every device (row-major over ``mesh``), which shard of an array split by ``spec`` it
    holds: the shard's block index per dim, flattened. Devices that differ only along axes the
    spec does not use hold the same shard."""
    names, sizes = list(mesh), list(mesh.values())
    out = []
    for device in range(math.prod(sizes)):
        coords, rest = {}, device
        for name, size in zip(reversed(names), reversed(sizes), strict=True):
            coords[name] = rest % size
            rest //= size
        shard = 0
        for axes in spec:
            block = 0
            for a in axes:
                block = block * mesh[a] + coords[a]
            shard = shard * math.prod(mesh[a] for a in axes) + block
        out.append(shard)
    return tuple(out)


def param_row(p: Placement, mesh: dict[str, int]) -> ParamRow:
    spec = tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in p.spec)
    spec = spec + ((),) * (len(p.shape) - len(spec))
    return ParamRow(p.path, p.shape, str(p.dtype), p.logical_axes, spec, p.bytes_per_device, shard_ids(spec, mesh))


def collective_lines(a: Analysis, prediction_hardware: Any = None) -> tuple[CollectiveLine, ...]:
    """The analysis's collectives grouped by (kind, dtype, axes), biggest bytes first, priced on
    the plan's hardware when it has one."""
    from mlsys_jax.analysis.prediction import link_for
    from mlsys_jax.meshes import load_preset

    hardware = prediction_hardware or a.hardware
    preset = (load_preset(hardware) if isinstance(hardware, str) else hardware) if hardware else None
    groups: dict[tuple[str, str, tuple[str, ...]], list[float]] = {}
    for r in a.collectives:
        acc = groups.setdefault((r.label, r.dtype, r.axes), [0, 0, 0, 0.0])
        acc[0] += 1
        acc[1] += r.count
        acc[2] += r.count * r.payload_bytes
        if preset is not None:
            acc[3] += r.count * row_time(r, link_for(preset, r.axes))
    lines = [
        CollectiveLine(kind, dtype, axes, int(ops), int(runs), int(moved), seconds if preset is not None else None)
        for (kind, dtype, axes), (ops, runs, moved, seconds) in groups.items()
    ]
    return tuple(sorted(lines, key=lambda c: (-(c.seconds_per_step or 0.0), -c.bytes_per_step)))


def pipeline_view(schedule: Any, stage_activations: tuple[int, ...]) -> PipelineView:
    def cell(work: Any) -> str:
        if work is None:
            return ""
        return f"{work}.{schedule.local_chunk(work.chunk)}" if schedule.virtual > 1 else str(work)

    grid = tuple(tuple(cell(row[s]) for row in schedule.grid) for s in range(schedule.stages))
    return PipelineView(
        schedule.name,
        schedule.stages,
        schedule.microbatches,
        schedule.virtual,
        schedule.bubble,
        schedule.peak_stash,
        grid,
        stage_activations,
    )


def build_report(compile_step: bool = False, hardware: Any = None, **settings: Any) -> PlanReport:
    """The report of the plan the recipe's ``settings`` describe. With ``compile_step`` the train
    step is compiled ahead of time (``analyze``) for its collectives and compiled figures;
    ``hardware`` (a preset name or ``MeshPreset``) prices a plan given as axis sizes."""
    from mlsys_jax.analysis.compiled_step import analyze, shapes_only
    from mlsys_jax.analysis.parts import plan_parts
    from mlsys_jax.train.config import RunConfig

    cfg = RunConfig.of(**settings)
    parts = plan_parts(cfg)
    analysis = analyze(**settings) if compile_step else shapes_only(cfg)
    mesh = dict(parts.plan.axis_sizes)
    placements = parts.plan.placements(parts.model.specs)
    memory = analysis.memory
    if memory.hbm is None and hardware is not None:
        from mlsys_jax.meshes import load_preset

        device = (load_preset(hardware) if isinstance(hardware, str) else hardware).device
        memory = dataclasses.replace(memory, hbm=device.hbm_bytes)
    fix = None
    if memory.fits is False:
        found = fit_fix(cfg, memory)
        fix = found.describe() if found is not None else None
    priced = hardware or analysis.hardware
    prediction = predict(analysis, priced) if priced is not None else None
    preset_name = priced if isinstance(priced, str) else getattr(priced, "name", None)
    device_kind = parts.preset.device.kind if parts.preset is not None else None
    if device_kind is None and priced is not None:
        from mlsys_jax.meshes import load_preset

        device_kind = (load_preset(priced) if isinstance(priced, str) else priced).device.kind
    return PlanReport(
        model=cfg.model.model,
        parameters=sum(math.prod(p.shape) for p in placements),
        strategy=analysis.strategy,
        mesh_label=cfg.mesh.mesh,
        mesh=mesh,
        hardware=preset_name,
        device_kind=device_kind,
        batch=analysis.batch,
        seq=analysis.seq,
        microbatches=analysis.microbatches,
        params=tuple(param_row(p, mesh) for p in placements),
        memory=memory,
        fix=fix,
        compiled=analysis.compiled,
        collectives=collective_lines(analysis, priced),
        prediction=prediction,
        pipeline=pipeline_view(parts.schedule, memory.stages) if parts.schedule is not None else None,
        notes=analysis.notes,
    )
