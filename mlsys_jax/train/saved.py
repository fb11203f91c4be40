"""A training run's saved model: its settings, its model rebuilt from them, and one step's
parameters restored onto any plan (what exporting and serving read)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlsys_jax.models import registry
from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel import Plan
from mlsys_jax.train.checkpoint import Checkpointer, CheckpointError
from mlsys_jax.train.optim import OptimConfig, adamw
from mlsys_jax.train.state import abstract_state


@dataclasses.dataclass
class SavedRun:
    """One step of a run: where, which step, the settings it recorded, its model and parameters."""

    directory: Path
    step: int
    settings: dict[str, Any]
    model: LanguageModel
    params: Any


def model_of(settings: dict[str, Any], **overrides: Any) -> LanguageModel:
    """The model a run trained, rebuilt from the config it recorded (not from its preset, which
    may have changed, nor from an imported folder, which may be gone); ``overrides`` its config
    has no field for are left out."""
    family, _ = registry.parse_model(settings["model"])
    fields = {f.name for f in dataclasses.fields(family.config)}
    config = family.config(**{**settings["model_config"], **{k: v for k, v in overrides.items() if k in fields}})
    return family.build(config, settings["model"])


def restore_run(
    ckpt_dir: str | Path, step: int | None, plan_for: Callable[[LanguageModel], Plan], **overrides: Any
) -> SavedRun:
    """Restore a step (default: the newest) of the run in ``ckpt_dir`` onto ``plan_for(model)``;
    ``overrides`` change how the model runs (its compute dtype, say)."""
    directory = Path(ckpt_dir).expanduser()
    if not directory.is_dir():
        raise CheckpointError(
            f"--ckpt-dir {str(ckpt_dir)!r} is not a folder. Fix: give the --ckpt-dir of a training run (make demo "
            "trains one into runs/train_lm)."
        )
    ckpt = Checkpointer(directory)
    try:
        steps = ckpt.all_steps()
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise CheckpointError(
                f"{directory} holds no checkpoint"
                + (f" at step {step}" if step is not None else "")
                + f" (steps: {steps or 'none'}). Fix: give the run's --ckpt-dir, or one of its steps."
            )
        settings = ckpt.read_meta(step)
        model = model_of(settings, **overrides)
        plan = plan_for(model)
        optimizer = adamw(
            OptimConfig(lr=settings["lr"], warmup_steps=settings["warmup"], total_steps=settings["steps"]),
            model.specs,
        )
        state = ckpt.restore(abstract_state(plan, model.specs, optimizer), step).state
    finally:
        ckpt.close()
    return SavedRun(directory, step, settings, model, state.params)
