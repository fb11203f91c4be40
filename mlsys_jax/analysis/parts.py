"""The pieces of a plan a recipe's settings describe, built from shapes alone: the mesh preset,
model, plan, pipeline schedule and optimizer, refusing settings that cannot work before anything
compiles (the recipe's own checks)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import optax

from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel.plan import Plan

if TYPE_CHECKING:
    from mlsys_jax.meshes import MeshPreset
    from mlsys_jax.parallel.pipeline import Schedule
    from mlsys_jax.train.config import RunConfig


@dataclasses.dataclass(frozen=True)
class PlanParts:
    """What a run would train with: its preset (None for explicit sizes), model, plan, schedule
    (None without a pipeline) and optimizer."""

    preset: MeshPreset | None
    model: LanguageModel
    plan: Plan
    schedule: Schedule | None
    optimizer: optax.GradientTransformation


def plan_parts(cfg: RunConfig, concrete: bool = False) -> PlanParts:
    """The run's parts on an abstract mesh, or with ``concrete`` on this process's devices."""
    import jax

    from mlsys_jax.comm.grad_sync import preset_slice_size
    from mlsys_jax.mesh import MeshError, abstract_mesh, make_mesh
    from mlsys_jax.models import registry
    from mlsys_jax.parallel import resolve_mesh, rules
    from mlsys_jax.train.config import model_overrides
    from mlsys_jax.train.optim import OptimConfig, adamw
    from mlsys_jax.train.setup import pipeline_schedule
    from mlsys_jax.train.step import check_batch, check_grad_sync_mesh

    preset, sizes, strategy = resolve_mesh(cfg.mesh.mesh, cfg.mesh.strategy, cfg.mesh.sequence_parallel)
    if -1 in sizes.values():
        raise MeshError(
            f"--mesh {cfg.mesh.mesh!r}: an axis of -1 ('the rest') has no size without devices. Fix: give every "
            "axis a size to plan it."
        )
    model = registry.build_model(cfg.model.model, **model_overrides(cfg))
    layout: Any = preset if preset is not None else sizes
    wanted = math.prod(sizes.values())
    mesh = make_mesh(layout, devices=jax.devices()[:wanted]) if concrete else abstract_mesh(layout)
    plan = Plan(
        mesh,
        rules(strategy, sequence_parallel=cfg.mesh.sequence_parallel),
        device=preset.device if preset is not None else None,
    )
    check_batch(plan, cfg.data.batch, cfg.data.microbatches)
    schedule = pipeline_schedule(cfg, plan.axis_sizes.get("pipeline", 1), strategy, model)
    mesh_label = f"--mesh {cfg.mesh.mesh} --strategy {strategy}"
    check_grad_sync_mesh(
        cfg.mesh.grad_sync, plan.axis_sizes, schedule is not None, preset_slice_size(preset), mesh_label
    )
    optimizer = adamw(OptimConfig(lr=cfg.optimizer.lr, warmup_steps=cfg.optimizer.warmup), model.specs)
    return PlanParts(preset, model, plan, schedule, optimizer)


def train_step_of(cfg: RunConfig, parts: PlanParts) -> Any:
    """The train step the recipe would build for these settings and parts."""
    from mlsys_jax.comm.grad_sync import preset_slice_size
    from mlsys_jax.train.step import make_train_step

    return make_train_step(
        parts.model,
        parts.plan,
        parts.optimizer,
        microbatches=cfg.data.microbatches,
        schedule=parts.schedule,
        pipeline_stash=cfg.mesh.pipeline_stash,
        pipeline_weights=cfg.mesh.pipeline_weights,
        grad_sync=cfg.mesh.grad_sync,
        sync_slice=preset_slice_size(parts.preset),
    )


def batch_shards(settings: dict[str, Any]) -> int:
    """How many ways the plan the settings describe splits the batch (before any batch is given)."""
    from mlsys_jax.mesh import abstract_mesh
    from mlsys_jax.parallel import resolve_mesh, rules

    cfg_mesh = settings["mesh"]
    preset, sizes, strategy = resolve_mesh(
        str(cfg_mesh), settings.get("strategy"), bool(settings.get("sequence_parallel", False))
    )
    if -1 in sizes.values():
        return 1
    layout: Any = preset if preset is not None else sizes
    plan = Plan(abstract_mesh(layout), rules(strategy, sequence_parallel=bool(settings.get("sequence_parallel"))))
    return plan.batch_shards
