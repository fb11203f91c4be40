"""Loss and gradients with the data-parallel gradient sum written by us, not XLA.

Each data-parallel replica runs the loss and its backward on its own rows inside a
``shard_map`` that is manual over the ``data`` axis only (FSDP, tensor and sequence axes stay
with the partitioner, so the plan's other shardings compose). Its gradients are then its own,
unsummed; every layer's weights carry ``comm.grad_sync.synced``, so the backward scan sums layer
l's gradient with the chosen algorithm as soon as it exists, and the weights outside the layers
(embedding, head, final norm) are summed where their backward ends. With several microbatches
the replica accumulates its own gradients first and sums once at the end (no per-layer overlap,
but one reduction per step rather than one per microbatch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mlsys_jax.comm.grad_sync import check_grad_sync, default_slice_size, on_local_shards, reducer, synced
from mlsys_jax.models.base import LanguageModel, loss_sums
from mlsys_jax.parallel.pipeline.executor import inside_layout, split_microbatches, without
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.train.compute import cast_for_compute

DATA = "data"

_is_spec = lambda x: isinstance(x, P)

LossAndGrads = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array, Any]]


def synced_loss_and_grads(
    model: LanguageModel, plan: Plan, grad_sync: str, microbatches: int = 1, slice_size: int | None = None
) -> LossAndGrads:
    """``(params, batch) -> (loss_sum, count, grads)`` over the whole batch, the gradients of
    the summed loss summed over the data axis by ``grad_sync`` (``ring``, ``tree``,
    ``hierarchical`` or ``ps``; see ``comm.grad_sync``). ``slice_size`` is how many consecutive
    data devices form one slice for ``hierarchical`` (default: ``default_slice_size``)."""
    n = plan.axis_sizes.get(DATA, 1)
    slice_size = default_slice_size(n) if slice_size is None else slice_size
    check_grad_sync(grad_sync, n, slice_size)
    reduce = reducer(grad_sync, DATA, slice_size)
    key = model.layers_key
    # Each gradient is summed on the shards the plan gives its weight (FSDP's, tensor's).
    specs = jax.tree_util.tree_map(lambda s: without(s, (DATA,)), plan.param_pspecs(model.specs), is_leaf=_is_spec)
    layer_specs = jax.tree_util.tree_map(lambda s: P(*tuple(s)[1:]), specs[key], is_leaf=_is_spec)
    marks = {k: synced(reduce, layer_specs if k == key else v) for k, v in specs.items()}
    per_layer = microbatches == 1
    layout = inside_layout(plan.layout, (DATA,))
    if per_layer:
        layout = dataclasses.replace(layout, layer_weights=marks[key])

    def loss(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        compute = cast_for_compute(model, params)  # summed in the compute dtype, as XLA sums them
        if per_layer:
            compute = {k: v if k == key else marks[k](v) for k, v in compute.items()}
        return loss_sums(model, compute, batch, layout)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def replica(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, Any]:
        if per_layer:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:

            def accumulate(carry: Any, mb: dict[str, jax.Array]) -> tuple[Any, None]:
                loss_acc, count_acc, grads_acc = carry
                (loss_sum, count), grads = grad_fn(params, mb)
                return (loss_acc + loss_sum, count_acc + count, jax.tree_util.tree_map(jnp.add, grads_acc, grads)), None

            zero = jnp.zeros((), jnp.float32)
            init = (zero, zero, jax.tree_util.tree_map(jnp.zeros_like, params))
            (loss_sum, count, grads), _ = jax.lax.scan(accumulate, init, split_microbatches(batch, microbatches))
            sums = jax.tree_util.tree_map(lambda s: on_local_shards(reduce, s), specs, is_leaf=_is_spec)
            grads = jax.tree_util.tree_map(lambda f, g: f(g), sums, grads)
        return jax.lax.psum(loss_sum, DATA), jax.lax.psum(count, DATA), grads

    def run(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, Any]:
        whole = jax.tree_util.tree_map(lambda _: P(), params)
        program = jax.shard_map(
            replica,
            mesh=plan.mesh,
            in_specs=(whole, {k: P(DATA) for k in batch}),
            out_specs=(P(), P(), whole),
            axis_names={DATA},
            check_vma=False,
        )
        return program(params, batch)

    return run


__all__ = ["synced_loss_and_grads"]
