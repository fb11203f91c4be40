"""The ``mlsys-jax`` command: ``train`` runs the training recipe, ``plan`` shows what a model
costs per device on a mesh preset before any accelerator is paid for."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Literal

import tyro
from rich.console import Console

from mlsys_jax.analysis.files import write_whole


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Show a plan before paying for it: placements, memory per device and the fit, collectives,
    the predicted step, the pipeline; as terminal views, --html and --json."""

    model: str = "7b"
    """Model as family:preset (llama:7b) or a Llama preset: tiny, tiny8, small, 125m, 1b, 7b, 8b, 70b.
    Families outside the toolkit load from $MLSYS_JAX_PLUGINS or 'mlsys_jax.models' entry points."""
    mesh: str = "gpu-h100x8"
    """Mesh preset name or axis sizes such as 'fsdp=8,tensor=4'."""
    strategy: str | None = None
    """Rule preset (default: the mesh preset's)."""
    sequence_parallel: bool = False
    """Shard activations' sequence dim over the 'sequence' mesh axis."""
    batch: int | None = None
    """Global batch in sequences (default: one sequence per batch shard and microbatch)."""
    seq: int = 2048
    """Sequence length in tokens."""
    microbatches: int | None = None
    """Microbatches per step (default: 8 with a pipeline axis, else 1)."""
    schedule: str = "1f1b"
    """Pipeline schedule when the mesh has a pipeline axis: gpipe, 1f1b, interleaved, zb."""
    virtual_stages: int = 1
    """Model chunks per pipeline device for --schedule interleaved."""
    remat: str = "none"
    """Activation checkpointing: none, full, save_dots."""
    grad_sync: Literal["xla", "ring", "tree", "hierarchical", "ps"] = "xla"
    """How gradients are summed over the data axis, as the recipe's flag: each algorithm priced by
    its own steps and bytes (xla as XLA's ring)."""
    attention_impl: str = "xla"
    """Attention backend, as the recipe's flag (pallas and cudnn keep no sequence x sequence scores)."""
    loss_impl: str = "xla"
    """Loss backend, as the recipe's flag (fused never forms the logits)."""
    tp_matmul: Literal["xla", "collective"] = "xla"
    """Tensor-parallel projections, as the recipe's flag: einsums (all-reduces) or collective
    matmuls (rings of permutes)."""
    hardware: str | None = None
    """Mesh preset whose device and links price a mesh given as axis sizes (default: the mesh's own preset)."""
    compile: bool = False
    """Also compile the train step ahead of time on simulated CPU devices (a subprocess when the
    mesh is larger than this process's) and show its bytes per device and every collective."""
    param: str | None = None
    """Parameter whose shards the mesh grid shows (default: the largest)."""
    html: str | None = None
    """Also write the report as one self-contained HTML page to this path."""
    json: str | None = None
    """Also write the report as JSON to this path ('-' for standard output, alone)."""
    auto: bool = False
    """Search the plans of --model on --devices devices of --hardware (default: the --mesh preset):
    every factorization over data, fsdp, tensor, sequence and pipeline with schedules and remat,
    ranked analytically, the best few compiled to confirm; prints the top five and the winner's flags."""
    devices: int | None = None
    """Devices for --auto (default: the hardware preset's)."""
    confirm: int = 3
    """How many of --auto's best plans to compile ahead of time to confirm the ranking."""
    calibrate: bool = False
    """Fit this host's cost model on microbenchmarks alone (matmul rate, memory bandwidth, collective
    latency and bandwidth over --simulate-devices CPU devices), save it to --calibration, then predict
    this plan's step on it and measure the real step (when it fits this host)."""
    calibration: str | None = None
    """A calibration file (written by --calibrate) whose host prices the plan; with --calibrate,
    where to write it (default ~/.cache/mlsys-jax/calibration.json)."""
    simulate_devices: int = 8
    """CPU devices --calibrate measures over (and the most a plan it measures may use)."""


def plan_settings(cfg: PlanConfig) -> dict[str, object]:
    """The recipe settings a plan's flags describe, with the defaults filled in."""
    from mlsys_jax.analysis.parts import batch_shards
    from mlsys_jax.parallel import resolve_mesh

    _, sizes, _ = resolve_mesh(cfg.mesh, cfg.strategy, cfg.sequence_parallel)
    piped = sizes.get("pipeline", 1) > 1
    microbatches = cfg.microbatches or (8 if piped else 1)
    settings: dict[str, object] = {
        "model": cfg.model,
        "mesh": cfg.mesh,
        "strategy": cfg.strategy,
        "sequence_parallel": cfg.sequence_parallel,
        "seq": cfg.seq,
        "microbatches": microbatches,
        "remat": cfg.remat,
        "attention_impl": cfg.attention_impl,
        "loss_impl": cfg.loss_impl,
        "schedule": cfg.schedule,
        "virtual_stages": cfg.virtual_stages,
        "grad_sync": cfg.grad_sync,
        "tp_matmul": cfg.tp_matmul,
    }
    settings["batch"] = cfg.batch or batch_shards(settings) * microbatches
    return settings


def plan(cfg: PlanConfig, console: Console | None = None) -> bool:
    """Print the plan's views (and write --html/--json); returns whether it fits the device's
    HBM (True when no hardware is named)."""
    from mlsys_jax.analysis import views
    from mlsys_jax.analysis.compiled_step import MAX_SIMULATED
    from mlsys_jax.analysis.parts import plan_parts
    from mlsys_jax.analysis.report import build_report
    from mlsys_jax.parallel.errors import PlanError
    from mlsys_jax.train.config import RunConfig
    from mlsys_jax.train.report import make_console, plan_table

    if cfg.auto:
        return auto(cfg, console or make_console())
    if cfg.calibrate:
        return calibrate(cfg, console or make_console())
    hardware: object = cfg.hardware
    if cfg.calibration is not None:
        from mlsys_jax.analysis.calibration import load

        hardware = load(cfg.calibration).preset()
    settings = plan_settings(cfg)
    run_cfg = RunConfig.of(**settings)
    parts = plan_parts(run_cfg)
    if cfg.compile and parts.plan.num_devices > MAX_SIMULATED:
        raise PlanError(
            f"--compile: the mesh {cfg.mesh!r} has {parts.plan.num_devices} devices, more than the {MAX_SIMULATED} "
            "CPU devices that can be simulated. Fix: drop --compile for the plan from shapes alone, or plan a "
            "smaller mesh."
        )
    if cfg.hardware is not None:
        from mlsys_jax.meshes import load_preset

        load_preset(cfg.hardware)
    report = build_report(compile_step=cfg.compile, hardware=hardware, **settings)
    param = views.find_param(report, cfg.param)
    if cfg.json == "-":
        print(json.dumps(report.to_json(), indent=1))
        return report.memory.fits is not False
    console = console or make_console()
    label = cfg.mesh + (f", batch {report.batch} x {report.seq}")
    console.print(plan_table(parts.plan, parts.model, report.memory, label))
    console.print(views.mesh_grid(report, param))
    console.print(views.memory_bars(report))
    pipeline = views.pipeline_view(report)
    if pipeline is not None:
        console.print(pipeline)
    if cfg.compile:
        console.print(views.compiled_summary(report), soft_wrap=True)
    if report.collectives:
        console.print(views.collectives_table(report))
    console.print(views.prediction_summary(report), soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True)
    if cfg.json is not None:
        write_whole(cfg.json, json.dumps(report.to_json(), indent=1))
        console.print(f"wrote {cfg.json}")
    if cfg.html is not None:
        from mlsys_jax.analysis.html import render_html

        write_whole(cfg.html, render_html(report, param=param.path))
        console.print(f"wrote {cfg.html}")
    return report.memory.fits is not False


def auto(cfg: PlanConfig, console: Console) -> bool:
    """``plan --auto``: the planner's top five with why, and the winner as recipe flags; the
    winner's full report with --html/--json. False when no plan fits."""
    from mlsys_jax.analysis.planner import auto_plan, print_result
    from mlsys_jax.meshes import load_preset
    from mlsys_jax.parallel.errors import PlanError

    hardware = cfg.hardware or cfg.mesh
    if "=" in hardware:
        raise PlanError(
            f"--auto prices plans on a hardware preset, and {hardware!r} is axis sizes. Fix: --hardware PRESET "
            "(e.g. gpu-h100x8, tpu-v5p-64) with --devices N."
        )
    preset = load_preset(hardware)
    fixed = {k: v for k, v in (("attention_impl", cfg.attention_impl), ("loss_impl", cfg.loss_impl)) if v != "xla"}
    result = auto_plan(
        cfg.devices or preset.num_devices,
        hardware,
        cfg.model,
        batch=cfg.batch,
        seq=cfg.seq,
        confirm=cfg.confirm,
        progress=lambda line: console.print(line, soft_wrap=True),
        **fixed,
    )
    try:
        winner = result.winner
    except PlanError as err:  # nothing fits: the leanest plan's figure and what to change
        console.print(f"[red]does not fit[/]: {err}", soft_wrap=True)
        return False
    print_result(result, console)
    if cfg.html is not None or cfg.json is not None:
        from mlsys_jax.analysis.report import build_report

        report = build_report(compile_step=False, hardware=hardware, **winner.flags)
        if cfg.json is not None:
            write_whole(cfg.json, json.dumps({"auto": result.to_json(), "winner": report.to_json()}, indent=1))
        if cfg.html is not None:
            from mlsys_jax.analysis.html import render_html

            write_whole(cfg.html, render_html(report))
    return True


#: Where --calibrate writes its fit when --calibration does not say.
CALIBRATION = "~/.cache/mlsys-jax/calibration.json"

#: The most bytes (all devices together) a plan may need for --calibrate to measure its step here.
MEASURABLE_BYTES = 4 << 30


def calibrate(cfg: PlanConfig, console: Console) -> bool:
    """``plan --calibrate``: fit this host on microbenchmarks, save the fit, then predict the
    plan's step on it and, where the plan fits this host, measure the real step."""
    from mlsys_jax.analysis import calibration as cal_lib
    from mlsys_jax.analysis.parts import plan_parts
    from mlsys_jax.mesh import simulate_cpu_devices
    from mlsys_jax.train.config import RunConfig

    simulate_cpu_devices(cfg.simulate_devices)
    settings = plan_settings(cfg)
    parts = plan_parts(RunConfig.of(**settings))  # refuse a plan that cannot work before measuring
    console.print(f"calibrating on {cfg.simulate_devices} CPU devices (microbenchmarks only) ...")
    fitted = cal_lib.calibrate(log=lambda line: console.print(line, soft_wrap=True))
    path = fitted.save(cfg.calibration or CALIBRATION)
    console.print(cal_lib.calibration_table(fitted))
    console.print(f"wrote {path}; price plans on it with --calibration {path}")
    from mlsys_jax.analysis.memory import memory_of

    need = memory_of(RunConfig.of(**settings)).total * parts.plan.num_devices
    if parts.plan.num_devices > cfg.simulate_devices or need > MEASURABLE_BYTES:
        console.print(
            f"not measured: the plan needs {parts.plan.num_devices} devices and {need / 2**30:.1f} GiB in all, more "
            f"than this host's {cfg.simulate_devices} devices or {MEASURABLE_BYTES / 2**30:.0f} GiB",
            soft_wrap=True,
        )
        return True
    rows = cal_lib.validate(fitted, [settings])
    console.print(cal_lib.validation_table(rows))
    return True


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a request cannot work as asked; each message names what was wrong
    and how to fix it, so the user sees the message alone."""
    from mlsys_jax.analysis.calibration import CalibrationError
    from mlsys_jax.distributed import DistributedError
    from mlsys_jax.kernels.dispatch import KernelUnavailable
    from mlsys_jax.mesh import MeshError
    from mlsys_jax.meshes import PresetError
    from mlsys_jax.models.base import ConfigError
    from mlsys_jax.parallel.errors import PlanError
    from mlsys_jax.train.checkpoint import CheckpointError
    from mlsys_jax.train.data import DataError

    return (
        ConfigError,
        PlanError,
        MeshError,
        PresetError,
        KernelUnavailable,
        CheckpointError,
        DataError,
        DistributedError,
        CalibrationError,
    )


def run_failures() -> tuple[type[Exception], ...]:
    """The exceptions that mean a run started but could not go on (it diverged, the disk filled);
    each message names the step, the cause, what was kept and how to resume."""
    from mlsys_jax.analysis.files import ReportWriteError
    from mlsys_jax.models.hf.files import HFWriteError
    from mlsys_jax.train.checkpoint import CheckpointWriteError
    from mlsys_jax.train.loop import TrainingDiverged
    from mlsys_jax.train.metrics import MetricsWriteError

    return (TrainingDiverged, CheckpointWriteError, MetricsWriteError, ReportWriteError, HFWriteError)


#: Exit statuses: a request that cannot work as asked, and a run that could not go on.
USER_ERROR, RUN_FAILED = 2, 1


def explained(run: Callable[[], int], argv: list[str] | None = None) -> int:
    """``run()``'s exit status; a user error prints its one-line message and gives 2, a run that
    could not go on prints its message and gives 1. ``--debug`` among the arguments shows the
    traceback instead."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return run()
    except user_errors() as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    except run_failures() as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return RUN_FAILED


#: Flags are flat (--mesh, --lr) though the run's settings are grouped in sections.
FLAT = (tyro.conf.OmitArgPrefixes,)


def main(argv: list[str] | None = None) -> int:
    from mlsys_jax.serve.config import ServeConfig
    from mlsys_jax.train.config import RunConfig
    from mlsys_jax.train.hf_export import ExportConfig, export_run
    from mlsys_jax.train.run import train

    def run() -> int:
        cfg = tyro.extras.subcommand_cli_from_dict(
            {"train": RunConfig, "plan": PlanConfig, "export-hf": ExportConfig, "serve": ServeConfig},
            args=argv,
            description="mlsys-jax: train across a device mesh, plan one first, export a run to Hugging Face, "
            "or serve it behind an OpenAI-compatible API.",
            config=FLAT,
        )
        if isinstance(cfg, PlanConfig):
            return 0 if plan(cfg) else 1
        if isinstance(cfg, ExportConfig):
            export_run(cfg)
            return 0
        if isinstance(cfg, ServeConfig):
            from mlsys_jax.serve.server import serve

            serve(cfg)
            return 0
        train(cfg)
        return 0

    return explained(run, argv)


if __name__ == "__main__":
    sys.exit(main())
