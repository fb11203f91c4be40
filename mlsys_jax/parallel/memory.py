"""What a training plan holds per device, and whether it fits: parameters, gradients, optimizer
state and an estimate of the activations, against the HBM the mesh preset declares.

The figures come from shapes alone (no arrays, no compilation), so a plan that cannot fit is
refused before anything is allocated. The activation figure is the model's own simple count
(``LanguageModel.activation_bytes``) times the tokens one device holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.params import abstract_params, is_spec


class FitError(PlanError):
    """A run whose state and activations do not fit in device memory."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclasses.dataclass(frozen=True)
class MemoryPerDevice:
    """Bytes one device holds while training (gradients take the parameters' layout);
    ``activations`` is None when no batch was given."""

    params: int
    grads: int
    opt_state: int
    hbm: int | None
    activations: int | None = None

    @property
    def state(self) -> int:
        """Parameters, gradients and optimizer state."""
        return self.params + self.grads + self.opt_state

    @property
    def total(self) -> int:
        return self.state + (self.activations or 0)

    @property
    def fits(self) -> bool | None:
        return None if self.hbm is None else self.total <= self.hbm


def _shard_elements(plan: Plan, specs: Any) -> Any:
    """How many elements of each parameter one device holds, as a tree shaped like ``specs``."""
    shardings = plan.param_shardings(specs)

    def per_device(spec: Any, sharding: jax.sharding.NamedSharding) -> int:
        return math.prod(sharding.shard_shape(spec.shape))

    return jax.tree_util.tree_map(per_device, specs, shardings, is_leaf=is_spec)


def param_bytes(plan: Plan, specs: Any) -> int:
    """Per-device bytes of the parameters."""
    elems = jax.tree_util.tree_leaves(_shard_elements(plan, specs))
    dtypes = [jax.numpy.dtype(s.dtype).itemsize for s in jax.tree_util.tree_leaves(specs, is_leaf=is_spec)]
    return sum(n * w for n, w in zip(elems, dtypes))


def optimizer_bytes(plan: Plan, specs: Any, optimizer: optax.GradientTransformation) -> int:
    """Per-device bytes of the optimizer state: a parameter-shaped leaf (Adam's moments) is split
    like its parameter, anything else (counters) is replicated."""
    abstract = abstract_params(specs)
    shapes = jax.eval_shape(optimizer.init, abstract)
    elements = _shard_elements(plan, specs)
    total = 0

    def add_param_leaf(leaf: jax.ShapeDtypeStruct, count: int) -> int:
        nonlocal total
        total += count * leaf.dtype.itemsize
        return count

    def add_other(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        nonlocal total
        total += math.prod(leaf.shape) * leaf.dtype.itemsize
        return leaf

    optax.tree_map_params(
        optimizer,
        add_param_leaf,
        shapes,
        elements,
        transform_non_params=add_other,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return total


def activation_bytes(plan: Plan, model: LanguageModel, batch: int, seq: int, microbatches: int = 1) -> int:
    """An estimate of one device's activations for one microbatch: the tokens its batch shard
    holds times the model's bytes per token, divided over the devices that split each token's
    work (the axes that do not shard the batch)."""
    tokens = batch * seq / (plan.batch_shards * microbatches)
    splitters = plan.num_devices // plan.batch_shards
    return int(tokens * model.activation_bytes(seq) / max(splitters, 1))


def memory_per_device(
    plan: Plan,
    model: LanguageModel,
    optimizer: optax.GradientTransformation,
    batch: int | None = None,
    seq: int | None = None,
    microbatches: int = 1,
) -> MemoryPerDevice:
    """The training state's bytes per device and, given a batch, the activation estimate."""
    params = param_bytes(plan, model.specs)
    hbm = plan.device.hbm_bytes if plan.device is not None else None
    acts = None if batch is None or seq is None else activation_bytes(plan, model, batch, seq, microbatches)
    return MemoryPerDevice(params, params, optimizer_bytes(plan, model.specs, optimizer), hbm, acts)


def check_fit(mem: MemoryPerDevice, what: str) -> None:
    """Refuse a run whose memory per device exceeds the device's HBM, naming each part and a fix."""
    if mem.hbm is None or mem.total <= mem.hbm:
        return
    acts = "" if mem.activations is None else f" + activations ~{human_bytes(mem.activations)}"
    state_alone = mem.state > mem.hbm
    fix = (
        "a strategy that shards more of the state (fsdp, fsdp_tp), a mesh with more devices, or a smaller model"
        if state_alone
        else "a smaller --batch or --seq, more --microbatches, --remat full, or --loss-impl fused"
    )
    raise FitError(
        f"{what} does not fit: per device it needs {human_bytes(mem.total)} (parameters "
        f"{human_bytes(mem.params)} + gradients {human_bytes(mem.grads)} + optimizer state "
        f"{human_bytes(mem.opt_state)}{acts}) but a device has {human_bytes(mem.hbm)}. "
        f"Fix: {fix}; or pass --force to try anyway."
    )
