"""The train step: one jitted ``(state, batch) -> (state, metrics)`` with its shardings fixed.

Gradients of the summed loss are accumulated over microbatches in fp32 and divided by the token
count once, so any number of microbatches gives the same update as one big batch.

With a non-finite guard the step checks its loss and gradient norm on device and applies the
update only when both are finite, so the host can read metrics late and never train on NaNs:
``"skip"`` drops a bad update and moves on; ``"stop"`` leaves the state as it was and, because the
step also takes the number it expects the state to be at, every step dispatched after a bad one
is a no-op too, so the state stays the last good one until the host notices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax.comm.grad_sync import GradSyncError, check_grad_sync, default_slice_size
from mlsys_jax.models.base import LanguageModel, loss_sums
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.pipeline.executor import (
    gathered_specs,
    pipeline_loss,
    pipeline_loss_and_grads,
    split_microbatches,
)
from mlsys_jax.parallel.pipeline.schedule import Schedule, ScheduleError
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.train.compute import cast_for_compute
from mlsys_jax.train.state import TrainState, abstract_state, state_shardings
from mlsys_jax.train.synced import synced_loss_and_grads

BATCH_KEYS = ("inputs", "targets", "mask")
GUARDS = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A compiled-on-first-call train step and the shardings it expects and returns."""

    fn: Any
    plan: Plan
    model: LanguageModel
    optimizer: optax.GradientTransformation
    microbatches: int
    state_shardings: TrainState
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    guard: str | None = None
    schedule: Schedule | None = None

    def __call__(
        self, state: TrainState, batch: dict[str, jax.Array], step_number: int | None = None
    ) -> tuple[TrainState, dict]:
        """One step; a guarded step also takes the step number the state should be at (any
        negative number skips that check)."""
        if self.guard is None:
            return self.fn(state, batch)
        return self.fn(state, batch, self.step_number(step_number))

    @staticmethod
    def step_number(n: int | None) -> np.ndarray:
        return np.asarray(-1 if n is None else n, np.int32)

    def abstract_args(self, batch_size: int, seq_len: int, state: Any) -> tuple[Any, ...]:
        """The arguments to lower the step with: the state, the batch and, when guarded, the
        step number."""
        batch = self.abstract_batch(batch_size, seq_len)
        if self.guard is None:
            return state, batch
        return state, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=self.plan.replicated())

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "mask": jnp.bool_}
        return {
            k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes[k], sharding=self.batch_shardings[k])
            for k in BATCH_KEYS
        }

    def lower(self, batch_size: int, seq_len: int) -> Any:
        """Lower without any arrays (ahead-of-time): for compile-time and memory studies."""
        state = abstract_state(self.plan, self.model.specs, self.optimizer)
        return self.fn.lower(*self.abstract_args(batch_size, seq_len, state))


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every leaf (the norm that gradient clipping uses)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)))


def check_batch(plan: Plan, batch_size: int, microbatches: int) -> None:
    """Refuse a batch the mesh cannot split evenly, before anything is traced."""
    shards = plan.batch_shards
    if microbatches < 1:
        raise PlanError(f"microbatches must be at least 1, got {microbatches}")
    if batch_size % (shards * microbatches):
        raise PlanError(
            f"global batch {batch_size} cannot be split into {microbatches} microbatch(es) over "
            f"the {shards} batch shards of mesh {plan.describe_mesh()} (rules {plan.rules.name!r}): "
            f"it must be a multiple of {shards} x {microbatches} = {shards * microbatches}. "
            f"Fix: use --batch {max(1, round(batch_size / (shards * microbatches))) * shards * microbatches} "
            "or change --microbatches."
        )


def check_grad_sync_mesh(
    grad_sync: str, sizes: dict[str, int], pipelined: bool, sync_slice: int | None, mesh: str
) -> None:
    """Refuse a gradient sync that mesh axis ``sizes`` cannot use, before any device work (a size
    of -1, still to be filled from the devices, passes)."""
    data = sizes.get("data", 1)
    slice_size = default_slice_size(data) if sync_slice is None else sync_slice
    try:
        check_grad_sync(grad_sync, data, slice_size if data > 0 else None)
    except GradSyncError as e:
        raise PlanError(str(e)) from None
    if grad_sync == "xla":
        return
    if pipelined:
        raise PlanError(
            f"grad_sync={grad_sync!r} runs its own gradient sum in the layer scan, and the pipeline "
            f"executor sums its stages' gradients itself. Fix: --grad-sync xla with a pipeline."
        )
    if data == 1:
        raise PlanError(
            f"grad_sync={grad_sync!r} sums gradients over the data axis, which {mesh} does not have: "
            "there is nothing for it to sum. Fix: a mesh with data > 1 (e.g. --mesh data=2,fsdp=4 "
            "--strategy dp_fsdp), or --grad-sync xla."
        )


def make_train_step(
    model: LanguageModel,
    plan: Plan,
    optimizer: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    lr_schedule: optax.Schedule | None = None,
    donate: bool = True,
    guard: str | None = None,
    schedule: Schedule | None = None,
    pipeline_stash: str = "inputs",
    pipeline_weights: str = "sharded",
    grad_sync: str = "xla",
    sync_slice: int | None = None,
) -> TrainStep:
    """Build the jitted step. Batches are dicts of (batch, seq) arrays: ``inputs`` and
    ``targets`` (int32) and ``mask`` (bool, which target tokens count). ``guard`` is None (apply
    every update), ``"stop"`` or ``"skip"`` (see the module's docstring). With a pipeline
    ``schedule`` (the plan's rules cut ``layers`` over ``pipeline``) the loss and gradients come
    from the pipeline executor, its microbatches replacing ``microbatches``, and the metrics carry
    the executed ``pipeline_trace``; ``pipeline_stash`` is what its forwards keep (``inputs`` or
    ``residuals``, see ``pipeline_loss_and_grads``) and ``pipeline_weights`` whether FSDP gathers
    a stage's weights in every tick (``sharded``) or once per step (``gathered``). ``grad_sync``
    is ``"xla"`` (the partitioner sums gradients over the data axis) or one of our algorithms,
    issued layer by layer in the backward pass (``train.synced``); ``sync_slice`` is the
    hierarchical one's devices per slice."""
    if guard is not None and guard not in GUARDS:
        raise PlanError(f"guard={guard!r} is not one of {GUARDS} or None")
    pipelined = plan.axis_sizes.get("pipeline", 1) > 1 and plan.rules.pipelined
    if pipelined and schedule is None:
        raise ScheduleError(
            f"plan {plan.rules.name!r} cuts the layers over pipeline={plan.axis_sizes['pipeline']}, so the step needs "
            "a schedule. Fix: pass schedule=make_schedule('1f1b', stages, microbatches)."
        )
    if schedule is not None:
        if not pipelined:
            raise ScheduleError(
                f"a {schedule.name!r} schedule needs a plan that cuts the layers over a pipeline axis; plan "
                f"{plan.rules.name!r} on {plan.describe_mesh()} does not. Fix: a mesh with pipeline > 1 and a "
                "pp_* strategy, or no schedule."
            )
        microbatches = schedule.microbatches
    if pipeline_weights not in ("sharded", "gathered"):
        raise PlanError(f"pipeline_weights={pipeline_weights!r} is not 'sharded' or 'gathered'")
    mesh = f"{plan.describe_mesh()} (rules {plan.rules.name!r})"
    check_grad_sync_mesh(grad_sync, plan.axis_sizes, schedule is not None, sync_slice, mesh)
    synced_grads = (
        None if grad_sync == "xla" else synced_loss_and_grads(model, plan, grad_sync, microbatches, sync_slice)
    )
    gathered = schedule is not None and pipeline_weights == "gathered"
    stage_specs = gathered_specs(plan.param_pspecs(model.specs), model.layers_key) if gathered else None
    state_sh = state_shardings(plan, model.specs, optimizer)
    tokens_sh = plan.activation_sharding(("batch", "seq"))
    batch_sh = {k: tokens_sh for k in BATCH_KEYS}

    def batch_loss(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        compute = cast_for_compute(model, params, state_sh.params)
        return loss_sums(model, compute, batch, plan.layout)

    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array], *number: jax.Array) -> tuple[TrainState, dict]:
        check_batch(plan, batch["inputs"].shape[0], microbatches)
        extra = {}
        if schedule is not None:
            compute = cast_for_compute(model, state.params, state_sh.params)
            loss_sum, count, grads, extra["pipeline_trace"] = pipeline_loss_and_grads(
                model, schedule, compute, batch, plan.mesh, plan.layout, pipeline_stash, stage_specs
            )
            grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
        elif synced_grads is not None:
            loss_sum, count, grads = synced_grads(state.params, batch)
        elif microbatches == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch)
        else:
            # Row j*m + i goes to microbatch i: each microbatch keeps rows on every device.
            micro = split_microbatches(batch, microbatches)

            def accumulate(carry, mb):
                (loss_acc, count_acc, grads_acc) = carry
                mb = {k: plan.constrain(v, ("batch", "seq")) for k, v in mb.items()}
                (loss_sum, count), grads = grad_fn(state.params, mb)
                grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
                return (loss_acc + loss_sum, count_acc + count, grads_acc), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (loss_sum, count, grads), _ = jax.lax.scan(accumulate, init, micro)
        denom = jnp.maximum(count, 1.0)
        if schedule is None:  # the pipeline's gradients are already of the mean
            grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": global_norm(grads),
            "tokens": count,
            **extra,
        }
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state.step)
        if guard is None:
            return TrainState(state.step + 1, params, opt_state, state.rng), metrics
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        in_order = (number[0] < 0) | (state.step == number[0])
        apply = finite & in_order
        keep = lambda new, old: jnp.where(apply, new, old)
        params = jax.tree_util.tree_map(keep, params, state.params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
        advanced = apply if guard == "stop" else in_order
        metrics["finite"] = finite
        metrics["applied"] = apply
        return TrainState(state.step + advanced.astype(state.step.dtype), params, opt_state, state.rng), metrics

    number_sh = () if guard is None else (plan.replicated(),)
    fn = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, *number_sh),
        out_shardings=(state_sh, plan.replicated()),
        donate_argnums=(0,) if donate else (),
    )
    return TrainStep(fn, plan, model, optimizer, microbatches, state_sh, batch_sh, guard, schedule)


def make_eval_step(
    model: LanguageModel, plan: Plan, optimizer: optax.GradientTransformation, schedule: Schedule | None = None
) -> Any:
    """Jitted ``(params, batch) -> (loss_sum, count)`` for validation; with a pipeline
    ``schedule``, through its forwards, so no device gathers another stage's layers."""
    param_sh = state_shardings(plan, model.specs, optimizer).params
    tokens_sh = plan.activation_sharding(("batch", "seq"))

    def evaluate(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        compute = cast_for_compute(model, params, param_sh)
        if schedule is not None:
            return pipeline_loss(model, schedule, compute, batch, plan.mesh, plan.layout)
        return loss_sums(model, compute, batch, plan.layout)

    return jax.jit(
        evaluate,
        in_shardings=(param_sh, {k: tokens_sh for k in BATCH_KEYS}),
        out_shardings=plan.replicated(),
    )
