"""The memory model: what one device holds while training under a plan, and whether it fits.

- **state**: parameters, gradients (the parameters' layout) and optimizer state, from shapes and
  the plan's placements (``mlsys_jax.parallel.memory``);
- **activations**: the residuals the backward keeps, traced from the model's own program on
  shapes (``mlsys_jax.analysis.activations``) for one device's share of a microbatch: under
  ``tensor`` the traced model is one shard's (heads, KV heads and the MLP width divided, the
  residual stream whole), under ``sequence`` the sequence is; other axes that split a token's
  work, and families whose config does not name those widths, divide the figure. Under a pipeline a stage
  holds its layers' share, the schedule's peak stash of microbatches (their inputs, or their
  residuals with ``pipeline_stash="residuals"``) and one chunk's backward at work;
- **verdict**: against the device's HBM; a plan that does not fit is offered the first change
  that makes it fit (``fit_fix``), with the figure after.

The runtime's fit check (``mlsys_jax.train.setup``) and ``mlsys-jax plan`` both use this model.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import optax

from mlsys_jax.analysis.activations import ActivationMemory, activation_memory
from mlsys_jax.analysis.parts import PlanParts, plan_parts
from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.memory import human_bytes, optimizer_bytes, param_bytes
from mlsys_jax.parallel.plan import Plan

if TYPE_CHECKING:
    from mlsys_jax.parallel.pipeline import Schedule
    from mlsys_jax.train.config import RunConfig


class FitError(PlanError):
    """A run whose state and activations do not fit in device memory."""


@dataclasses.dataclass(frozen=True)
class PlanMemory:
    """Bytes one device holds while training, by part, against its HBM (None: no hardware)."""

    params: int
    grads: int
    opt_state: int
    activations: int
    hbm: int | None
    stages: tuple[int, ...] = ()
    """Under a pipeline, each stage's activations (``activations`` is their largest)."""
    notes: tuple[str, ...] = ()

    @property
    def state(self) -> int:
        return self.params + self.grads + self.opt_state

    @property
    def total(self) -> int:
        return self.state + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.hbm is None else self.total <= self.hbm

    @property
    def share(self) -> float | None:
        """The share of HBM the plan needs (above 1: it does not fit)."""
        return None if not self.hbm else self.total / self.hbm

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.params,
            "gradients": self.grads,
            "optimizer state": self.opt_state,
            "activations": self.activations,
        }

    def describe(self) -> str:
        """``12.3 GiB (params ... + activations ...) of 16 GiB (77%)``."""
        parts = " + ".join(f"{name} {human_bytes(n)}" for name, n in self.parts().items())
        budget = "" if self.hbm is None else f" of {human_bytes(self.hbm)} ({self.total / self.hbm:.0%})"
        return f"{human_bytes(self.total)} ({parts}){budget}"


def token_split(plan: Plan) -> int:
    """How many devices share one token's work: the mesh axes that do not shard the batch."""
    pipeline = plan.axis_sizes.get("pipeline", 1) if plan.rules.pipelined else 1
    return max(plan.num_devices // (plan.batch_shards * pipeline), 1)


#: Config fields a tensor split divides (Llama-family names).
TENSOR_WIDTHS = ("n_heads", "n_kv_heads", "d_ff")


def tensor_shard(model: LanguageModel, ways: int) -> LanguageModel | None:
    """The model one of ``ways`` tensor shards runs (each width divided where it divides; KV
    heads fewer than the ways stay whole, as the rules replicate them), or None when the
    family's config does not name its widths."""
    from mlsys_jax.models import registry

    cfg = model.config
    if ways == 1:
        return model
    if cfg is None or not all(hasattr(cfg, f) for f in TENSOR_WIDTHS):
        return None
    family, _ = registry.parse_model(model.name)
    local = {f: getattr(cfg, f) // ways for f in TENSOR_WIDTHS if getattr(cfg, f) % ways == 0}
    return family.build(dataclasses.replace(cfg, **local), model.name)


def stage_activations(
    acts: ActivationMemory, layers: int, schedule: Schedule, stash: str = "inputs"
) -> tuple[int, ...]:
    """Each pipeline stage's activations: its peak stash of microbatches, one chunk's backward at
    work, and the embedding's and loss's residuals on the stages that run them."""
    per_chunk = layers // schedule.chunks
    per_layer_saved = acts.layer if not acts.rematerialized else acts.input
    ends = max(acts.saved - layers * per_layer_saved, 0)  # embedding, head, loss
    entry = acts.input if stash == "inputs" else per_chunk * acts.layer
    at_work = per_chunk * acts.layer + acts.working
    peaks = [max(col) for col in zip(*schedule.stash(), strict=True)]
    out = []
    for stage, peak in enumerate(peaks):
        last = stage == schedule.stages - 1 or schedule.virtual > 1
        out.append(peak * entry + at_work + (ends if last else 0))
    return tuple(out)


def plan_memory(
    plan: Plan,
    model: LanguageModel,
    optimizer: optax.GradientTransformation,
    batch: int,
    seq: int,
    microbatches: int = 1,
    schedule: Schedule | None = None,
    pipeline_stash: str = "inputs",
) -> PlanMemory:
    """The memory one device needs to train ``model`` under ``plan`` (see the module's docstring)."""
    params = param_bytes(plan, model.specs)
    hbm = plan.device.hbm_bytes if plan.device is not None else None
    shards = plan.batch_shards * microbatches
    rows = max(batch // shards, 1)
    tensor, sequence = plan.shards_of("heads"), plan.shards_of("seq")
    local = tensor_shard(model, tensor)
    split, notes = token_split(plan), []
    if local is not None and local is not model:
        split //= tensor
    else:
        local = model
    if sequence > 1 and seq % sequence == 0:
        split //= sequence
        seq //= sequence
    acts = activation_memory(local, rows, seq)
    if split > 1:
        notes.append(f"activations divided over the {split} devices that share each token's work")
    stages: tuple[int, ...] = ()
    if schedule is None:
        activations = acts.total // split
    else:
        stages = tuple(n // split for n in stage_activations(acts, model.num_layers, schedule, pipeline_stash))
        activations = max(stages)
    return PlanMemory(
        params, params, optimizer_bytes(plan, model.specs, optimizer), activations, hbm, stages, tuple(notes)
    )


@dataclasses.dataclass(frozen=True)
class Fix:
    """A change of flags that makes a plan fit, and the memory after it."""

    flags: dict[str, Any]
    memory: PlanMemory

    def describe(self) -> str:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.flags.items())
        return f"{flags} (then {self.memory.describe()})"


def memory_of(cfg: RunConfig, parts: PlanParts | None = None) -> PlanMemory:
    """``plan_memory`` of the run a recipe's settings describe, from shapes alone (``parts``:
    its ``plan_parts``, when already built)."""
    p = parts if parts is not None else plan_parts(cfg)
    d = cfg.data
    return plan_memory(
        p.plan, p.model, p.optimizer, d.batch, d.seq, d.microbatches, p.schedule, cfg.mesh.pipeline_stash
    )


def candidate_changes(cfg: RunConfig, state_alone: bool = False) -> list[dict[str, Any]]:
    """Changes that lower the memory a run needs, cheapest to the user first: recompute
    activations, fused loss, more microbatches, a smaller batch, then sharding the state more
    (only the last helps when the state alone is too big)."""
    d, m = cfg.data, cfg.model
    out: list[dict[str, Any]] = []
    if not state_alone:
        lighter: dict[str, Any] = {}
        if m.remat != "full":
            lighter["remat"] = "full"
        if m.loss_impl != "fused":
            lighter["loss_impl"] = "fused"
        out += [{k: v} for k, v in lighter.items()]
        splits = [{"microbatches": d.microbatches * f} for f in (2, 4, 8, 16) if d.batch % (d.microbatches * f) == 0]
        out += splits
        out += [lighter | s for s in [{}, *splits] if len(lighter | s) > 1]
        out += [{"batch": d.batch // f} for f in (2, 4, 8) if d.batch % f == 0]
    if "=" not in cfg.mesh.mesh:  # a preset: its devices can take another strategy
        out += [{"strategy": s} for s in ("fsdp", "fsdp_tp") if cfg.mesh.strategy != s]
    return out


def fit_fix(cfg: RunConfig, memory: PlanMemory | None = None) -> Fix | None:
    """The first of ``candidate_changes`` after which the run fits in ``memory.hbm`` (the run's
    own device by default), or None if none does."""
    from mlsys_jax.train.config import RunConfig

    memory = memory or memory_of(cfg)
    if memory.hbm is None:
        return None
    state_alone = memory.state > memory.hbm
    for change in candidate_changes(cfg, state_alone):
        try:
            after = dataclasses.replace(memory_of(RunConfig.of(**{**cfg.flat(), **change})), hbm=memory.hbm)
        except (PlanError, ValueError):
            continue
        if after.fits:
            return Fix(change, after)
    return more_devices(cfg, memory.hbm) if state_alone else None


def more_devices(cfg: RunConfig, hbm: int, limit: int = 4096) -> Fix | None:
    """The smallest ``fsdp=N`` mesh (N a power of two, the batch raised to N where smaller, with
    activations recomputed where they are what overflows) on which the run fits devices of
    ``hbm`` bytes; None beyond ``limit`` devices."""
    from mlsys_jax.train.config import RunConfig

    n = 2
    while n <= limit:
        change: dict[str, Any] = {"mesh": f"fsdp={n}", "strategy": "fsdp"}
        if cfg.data.batch % (n * cfg.data.microbatches):
            change["batch"] = n * cfg.data.microbatches
        try:
            p = plan_parts(RunConfig.of(**{**cfg.flat(), **change}))
        except (PlanError, ValueError):
            n *= 2
            continue
        if param_bytes(p.plan, p.model.specs) * 2 + optimizer_bytes(p.plan, p.model.specs, p.optimizer) <= hbm:
            for lighter in ({}, {"remat": "full", "loss_impl": "fused"}):
                flags = change | {k: v for k, v in lighter.items() if cfg.flat()[k] != v}
                after = dataclasses.replace(memory_of(RunConfig.of(**{**cfg.flat(), **flags})), hbm=hbm)
                if after.fits:
                    return Fix(flags, after)
        n *= 2
    return None


def check_fit(memory: PlanMemory, what: str, cfg: RunConfig | None = None) -> None:
    """Refuse a run whose memory per device exceeds the device's HBM, naming each part, by how
    much, and the change that makes it fit with the figure after."""
    if memory.fits is not False or memory.hbm is None:
        return
    over = memory.total - memory.hbm
    fix = fit_fix(cfg, memory) if cfg is not None else None
    if fix is not None:
        advice = f"Fix: {fix.describe()}"
    elif memory.state > memory.hbm:
        advice = "Fix: a strategy that shards more of the state (fsdp, fsdp_tp), a mesh with more devices, or a smaller model"
    else:
        advice = "Fix: a smaller --batch or --seq, more --microbatches, --remat full, or --loss-impl fused"
    raise FitError(
        f"{what} does not fit: per device it needs {memory.describe()}, {human_bytes(over)} too much. "
        f"{advice}; or pass --force to try anyway."
    )


__all__ = [
    "FitError",
    "Fix",
    "PlanMemory",
    "check_fit",
    "fit_fix",
    "memory_of",
    "plan_memory",
    "stage_activations",
    "token_split",
]
