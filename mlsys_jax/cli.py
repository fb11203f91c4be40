"""The ``mlsys-jax`` command: ``train`` runs the training recipe, ``plan`` shows what a model
costs per device on a mesh preset before any accelerator is paid for."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import tyro
from rich.console import Console


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Show a model's placement and bytes per device on a mesh, without devices."""

    model: str = "7b"
    """Model as family:preset (llama:7b) or a Llama preset: tiny, tiny8, small, 125m, 1b, 7b, 8b, 70b.
    Families outside the toolkit load from $MLSYS_JAX_PLUGINS or 'mlsys_jax.models' entry points."""
    mesh: str = "gpu-h100x8"
    """Mesh preset name or axis sizes such as 'fsdp=8,tensor=4'."""
    strategy: str | None = None
    """Rule preset (default: the mesh preset's)."""
    sequence_parallel: bool = False
    """Shard activations' sequence dim over the 'sequence' mesh axis."""
    schedule: str = "1f1b"
    """Pipeline schedule shown when the mesh has a pipeline axis: gpipe, 1f1b, interleaved, zb."""
    microbatches: int = 8
    """Microbatches per step for the pipeline schedule."""
    virtual_stages: int = 1
    """Model chunks per pipeline device for --schedule interleaved."""
    compile: bool = False
    """Also compile the train step ahead of time on simulated CPU devices (a subprocess when the
    mesh is larger than this process's) and show its bytes per device and every collective."""
    batch: int = 16
    """Global batch in sequences, for --compile."""
    seq: int = 128
    """Sequence length, for --compile."""


def plan(cfg: PlanConfig, console: Console | None = None) -> bool:
    """Print the plan table; returns whether parameters, gradients and optimizer state fit in
    the preset's HBM (activations are not counted)."""
    from mlsys_jax.mesh import abstract_mesh
    from mlsys_jax.models import build_model
    from mlsys_jax.parallel import Plan, resolve_mesh, rules
    from mlsys_jax.parallel.memory import human_bytes, memory_per_device
    from mlsys_jax.parallel.pipeline import check_layers, make_schedule
    from mlsys_jax.train.optim import OptimConfig, adamw
    from mlsys_jax.train.report import make_console, plan_table

    console = console or make_console()
    preset, sizes, strategy = resolve_mesh(cfg.mesh, cfg.strategy, cfg.sequence_parallel)
    the_plan = Plan(
        abstract_mesh(preset if preset is not None else sizes),
        rules(strategy, sequence_parallel=cfg.sequence_parallel),
        device=preset.device if preset is not None else None,
    )
    model = build_model(cfg.model)
    stages = the_plan.axis_sizes.get("pipeline", 1)
    schedule = None
    if stages > 1 and the_plan.rules.pipelined:
        check_layers(model.num_layers, stages, cfg.virtual_stages)
        schedule = make_schedule(cfg.schedule, stages, cfg.microbatches, cfg.virtual_stages)
    optimizer = adamw(OptimConfig(), model.specs)
    console.print(plan_table(the_plan, model, optimizer, cfg.mesh))
    if schedule is not None:
        console.print(str(schedule), soft_wrap=True)
    if cfg.compile:
        from mlsys_jax.analysis import analyze
        from mlsys_jax.analysis.views import collectives_table, compiled_summary, prediction_summary

        settings = {"model": cfg.model, "mesh": cfg.mesh, "strategy": strategy, "batch": cfg.batch, "seq": cfg.seq}
        if schedule is not None:
            settings |= {
                "schedule": cfg.schedule,
                "microbatches": cfg.microbatches,
                "virtual_stages": cfg.virtual_stages,
            }
        analysis = analyze(**settings)
        console.print(compiled_summary(analysis))
        if analysis.collectives:
            console.print(collectives_table(analysis))
        if analysis.hardware is not None:
            console.print(prediction_summary(analysis))
    mem = memory_per_device(the_plan, model, optimizer)
    fits = mem.fits
    if fits is None or mem.hbm is None:
        console.print("no hardware given (explicit axis sizes): name a preset to check the fit")
        return True
    verdict = "[green]fits" if fits else "[red]does not fit"
    console.print(
        f"{verdict}[/]: {human_bytes(mem.total)} of state per device, "
        f"{human_bytes(mem.hbm)} HBM ({mem.total / mem.hbm:.0%}), before activations"
    )
    if not fits:
        console.print("Fix: a strategy that shards more of the state (fsdp, fsdp_tp) or a mesh with more devices.")
    return fits


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a request cannot work as asked; each message names what was wrong
    and how to fix it, so the user sees the message alone."""
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
    )


def run_failures() -> tuple[type[Exception], ...]:
    """The exceptions that mean a run started but could not go on (it diverged, the disk filled);
    each message names the step, the cause, what was kept and how to resume."""
    from mlsys_jax.train.checkpoint import CheckpointWriteError
    from mlsys_jax.train.loop import TrainingDiverged
    from mlsys_jax.train.metrics import MetricsWriteError

    return (TrainingDiverged, CheckpointWriteError, MetricsWriteError)


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
    from mlsys_jax.train.config import RunConfig
    from mlsys_jax.train.run import train

    def run() -> int:
        cfg = tyro.extras.subcommand_cli_from_dict(
            {"train": RunConfig, "plan": PlanConfig},
            args=argv,
            description="mlsys-jax: train across a device mesh, or plan one first.",
            config=FLAT,
        )
        if isinstance(cfg, PlanConfig):
            return 0 if plan(cfg) else 1
        train(cfg)
        return 0

    return explained(run, argv)


if __name__ == "__main__":
    sys.exit(main())
