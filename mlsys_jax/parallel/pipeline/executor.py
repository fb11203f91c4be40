"""Run a pipeline schedule as one SPMD program: a loop over the schedule's ticks inside a
``shard_map`` over the ``pipeline`` mesh axis only (the other axes stay with the partitioner).

Each device holds its stage's slice of the stacked layers. At every tick it does the work its
cell of the table names, chosen with ``lax.switch`` (one branch runs, not all of them masked), and
then activations move one stage on and their gradients one stage back with ``ppermute``. A
forward keeps only its stage input, in the slot the schedule assigns; the backward recomputes the
stage from it (per-stage rematerialisation), so 1F1B holds O(p) microbatch inputs where GPipe
holds m. A split backward (ZB-H1) computes the input gradient at B, keeps the output gradient,
and differentiates the weights at W. Weight gradients accumulate in fp32 in each stage's own slice. The embedding and the
head are replicated along ``pipeline``: the first stage embeds, the last computes the loss, and
their gradients are summed over the axis once at the end (cheap: two small matrices).

The loss is token-weighted over all microbatches, so ``loss_sum / count`` and the gradients equal
the unpipelined ones. The program also returns the (tick, stage) trace of the work it ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mlsys_jax.models.base import UNPLACED, LanguageModel, Layout, default_positions, run_layers
from mlsys_jax.parallel.pipeline.schedule import Schedule, ScheduleError, check_layers

AXIS = "pipeline"
DATA = "data"
IDLE, FORWARD, BACKWARD, WEIGHT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Tables:
    """The schedule as arrays the program indexes by (tick, stage): what to run, for which
    microbatch, in which stash slot; and where a message that arrives after the tick is kept
    until its work reads it (``*_store``: -1 when nothing arrives) and where that work reads it
    (``*_read``). Messages wait in slots because a stage may be busy with other work when one
    arrives (1F1B's steady state), and slots, not one buffer per microbatch, keep that O(p)."""

    kind: np.ndarray
    microbatch: np.ndarray
    slot: np.ndarray
    slots: int
    fwd_store: np.ndarray
    fwd_read: np.ndarray
    fwd_slots: int
    bwd_store: np.ndarray
    bwd_read: np.ndarray
    bwd_slots: int

    @classmethod
    def of(cls, schedule: Schedule) -> Tables:
        if schedule.virtual != 1:
            raise ScheduleError(
                f"the executor runs one chunk per stage; {schedule.name!r} with {schedule.virtual} virtual "
                "stages needs the interleaved layout"
            )
        kinds = {"F": FORWARD, "B": BACKWARD, "W": WEIGHT}
        shape = (schedule.ticks, schedule.stages)
        kind, micro = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        when: dict[tuple[str, int, int], int] = {}
        for t, row in enumerate(schedule.grid):
            for s, work in enumerate(row):
                if work is not None:
                    kind[t, s], micro[t, s] = kinds[work.kind], work.microbatch
                    when[(work.kind, work.microbatch, s)] = t
        slot = np.maximum(np.asarray(schedule.slots(), np.int32), 0)
        p = schedule.stages
        fwd = _mailbox(
            shape, [(when[("F", j, s - 1)], when[("F", j, s)], s) for (k, j, s) in when if k == "F" and s > 0]
        )
        bwd = _mailbox(
            shape, [(when[("B", j, s + 1)], when[("B", j, s)], s) for (k, j, s) in when if k == "B" and s < p - 1]
        )
        return cls(kind, micro, slot, max(schedule.peak_stash, 1), *fwd, *bwd)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fwd_slots", max(self.fwd_slots, 1))
        object.__setattr__(self, "bwd_slots", max(self.bwd_slots, 1))


def _mailbox(shape: tuple[int, int], messages: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Slots for messages sent at the end of tick ``sent`` and read by stage ``stage`` at tick
    ``read``: (store table, read table, slot count), lowest free slot first."""
    store, read = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
    by_stage: dict[int, list[tuple[int, int]]] = {}
    for sent, used, stage in messages:
        by_stage.setdefault(stage, []).append((sent, used))
    most = 0
    for stage, msgs in by_stage.items():
        busy: list[tuple[int, int]] = []  # (slot, read tick)
        for sent, used in sorted(msgs):
            busy = [(sl, r) for sl, r in busy if r > sent]  # a slot read at or before ``sent`` is free again
            taken = {sl for sl, _ in busy}
            sl = next(n for n in range(len(busy) + 1) if n not in taken)
            busy.append((sl, used))
            store[sent, stage], read[used, stage] = sl, sl
            most = max(most, len(busy))
    return store, read, most


def split_microbatches(batch: dict[str, jax.Array], microbatches: int) -> dict[str, jax.Array]:
    """(batch, seq) -> (m, batch/m, seq): row j*m + i goes to microbatch i, as the train step does."""

    def split(x: jax.Array) -> jax.Array:
        b, s = x.shape
        return jnp.swapaxes(x.reshape(b // microbatches, microbatches, s), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def pipeline_loss_and_grads(
    model: LanguageModel,
    schedule: Schedule,
    params: Any,
    batch: dict[str, jax.Array],
    mesh: jax.sharding.Mesh,
    layout: Layout = UNPLACED,
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """(loss_sum, token count, gradients of loss_sum / count, executed trace) of ``batch``, run
    by ``schedule`` over the mesh's ``pipeline`` axis. The trace is (stages, ticks, 2): the kind
    (0 idle, 1 F, 2 B, 3 W) and microbatch of what each stage ran at each tick."""
    p, m = schedule.stages, schedule.microbatches
    if mesh.shape.get(AXIS, 1) != p:
        raise ScheduleError(
            f"the schedule has {p} stages but the mesh's pipeline axis is {mesh.shape.get(AXIS, 1)}. Fix: build "
            f"the schedule for {mesh.shape.get(AXIS, 1)} stages, or a mesh with pipeline={p}."
        )
    replicas = mesh.shape.get(DATA, 1)
    rows = batch["inputs"].shape[0]
    if rows % (m * replicas):
        fits = m * replicas
        raise ScheduleError(
            f"a batch of {rows} rows cannot be split into {m} microbatches over {replicas} data replica(s): it "
            f"must be a multiple of {m} x {replicas} = {fits}. Fix: a batch of {max(fits, rows // fits * fits)} "
            f"or {(rows // fits + 1) * fits}, or another microbatch count."
        )
    key = model.layers_key
    check_layers(model.num_layers, p)
    tables = Tables.of(schedule)
    micro = split_microbatches(batch, m)
    count = jnp.sum(batch["mask"].astype(jnp.float32))
    layers, outer = params[key], {k: v for k, v in params.items() if k != key}

    def stage(layers: Any, x: jax.Array, positions: jax.Array) -> jax.Array:
        return run_layers(model, layers, x, positions, layout)[0]

    def program(layers: Any, outer: Any, micro: dict[str, jax.Array], count: jax.Array):
        s = jax.lax.axis_index(AXIS)
        first, last = s == 0, s == p - 1
        tokens0 = micro["inputs"][0]
        positions = default_positions(tokens0)
        x_like = model.embed(outer, tokens0, positions, layout)
        zeros_x = jnp.zeros_like(x_like)
        f32 = lambda t: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), t)
        kind_t, micro_t, slot_t = (jnp.asarray(a) for a in (tables.kind, tables.microbatch, tables.slot))
        fstore_t, fread_t = jnp.asarray(tables.fwd_store), jnp.asarray(tables.fwd_read)
        bstore_t, bread_t = jnp.asarray(tables.bwd_store), jnp.asarray(tables.bwd_read)

        def head_loss(outer: Any, y: jax.Array, i: jax.Array) -> jax.Array:
            loss_sum, _ = model.loss({**outer, key: layers}, y, micro["targets"][i], micro["mask"][i], layout)
            return loss_sum

        def add(acc: Any, d: Any) -> Any:
            return jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), acc, d)

        def tick(carry, t):
            recv_f, recv_b, stash, cots, g_layers, g_outer, loss = carry
            k, i, slot = kind_t[t, s], micro_t[t, s], slot_t[t, s]
            fwd_in = jax.lax.dynamic_index_in_dim(recv_f, fread_t[t, s], 0, keepdims=False)
            bwd_in = jax.lax.dynamic_index_in_dim(recv_b, bread_t[t, s], 0, keepdims=False)
            cot_loss = jnp.where(last, 1.0, 0.0).astype(jnp.float32)

            def through(outer: Any, layers: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
                """The stage from its stashed input (the first embeds its tokens), with the loss
                share on the last: what a backward differentiates."""
                x = jnp.where(first, model.embed(outer, micro["inputs"][i], positions, layout), x)
                y = stage(layers, x, positions)
                return y, head_loss(outer, y, i) / count

            def idle(_):
                return stash, cots, zeros_x, zeros_x, g_layers, g_outer, loss

            def forward(_):
                x = jnp.where(first, model.embed(outer, micro["inputs"][i], positions, layout), fwd_in)
                new_stash = jax.lax.dynamic_update_index_in_dim(stash, x, slot, 0)
                y = stage(layers, x, positions)
                gain = jnp.where(last, head_loss(outer, y, i), 0.0)
                return new_stash, cots, y, zeros_x, g_layers, g_outer, loss + gain

            def backward(_):
                x = jax.lax.dynamic_index_in_dim(stash, slot, 0, keepdims=False)
                cot_y = jnp.where(last, jnp.zeros_like(x), bwd_in.astype(x.dtype))
                if schedule.split_backward:  # B: the input gradient only; W comes later
                    _, pull = jax.vjp(lambda x: through(outer, layers, x), x)
                    (dx,) = pull((cot_y, cot_loss))
                    new_cots = jax.lax.dynamic_update_index_in_dim(cots, cot_y, slot, 0)
                    return stash, new_cots, zeros_x, dx, g_layers, g_outer, loss
                _, pull = jax.vjp(through, outer, layers, x)
                d_outer, d_layers, dx = pull((cot_y, cot_loss))
                return stash, cots, zeros_x, dx, add(g_layers, d_layers), add(g_outer, d_outer), loss

            def weight(_):
                x = jax.lax.dynamic_index_in_dim(stash, slot, 0, keepdims=False)
                cot_y = jax.lax.dynamic_index_in_dim(cots, slot, 0, keepdims=False)
                _, pull = jax.vjp(lambda outer, layers: through(outer, layers, x), outer, layers)
                d_outer, d_layers = pull((cot_y, cot_loss))
                return stash, cots, zeros_x, zeros_x, add(g_layers, d_layers), add(g_outer, d_outer), loss

            branches = (idle, forward, backward, weight) if schedule.split_backward else (idle, forward, backward)
            out = jax.lax.switch(k, branches, None)
            new_stash, new_cots, send_fwd, send_bwd, g_layers, g_outer, loss = out
            got_f = jax.lax.ppermute(send_fwd, AXIS, [(j, j + 1) for j in range(p - 1)])
            got_b = jax.lax.ppermute(send_bwd, AXIS, [(j + 1, j) for j in range(p - 1)])
            fs, bs = fstore_t[t, s], bstore_t[t, s]
            recv_f = jnp.where(
                fs >= 0, jax.lax.dynamic_update_index_in_dim(recv_f, got_f, jnp.maximum(fs, 0), 0), recv_f
            )
            recv_b = jnp.where(
                bs >= 0, jax.lax.dynamic_update_index_in_dim(recv_b, got_b, jnp.maximum(bs, 0), 0), recv_b
            )
            return (recv_f, recv_b, new_stash, new_cots, g_layers, g_outer, loss), jnp.stack([k, i])

        stash = jnp.zeros((tables.slots, *x_like.shape), x_like.dtype)
        recv_f = jnp.zeros((tables.fwd_slots, *x_like.shape), x_like.dtype)
        recv_b = jnp.zeros((tables.bwd_slots, *x_like.shape), x_like.dtype)
        # Split backwards keep each microbatch's output gradient from its B until its W.
        cots = jnp.zeros((tables.slots if schedule.split_backward else 1, *x_like.shape), x_like.dtype)
        init = (recv_f, recv_b, stash, cots, f32(layers), f32(outer), jnp.zeros((), jnp.float32))
        (_, _, _, _, g_layers, g_outer, loss), trace = jax.lax.scan(tick, init, jnp.arange(schedule.ticks))
        g_outer = jax.lax.psum(g_outer, (AXIS, *data))
        loss = jax.lax.psum(loss, (AXIS, *data))
        if data:
            g_layers = jax.lax.psum(g_layers, data)
        return loss, g_layers, g_outer, trace[None]

    # The data axis is manual too: its replicas then run their ticks with no collective inside a
    # branch (each replica sums its own rows) and add their gradients once at the end. A runtime
    # may not let devices that took different branches meet in a collective.
    data = (DATA,) if mesh.shape.get(DATA, 1) > 1 else ()
    layer_spec = jax.tree_util.tree_map(lambda _: P(AXIS), layers)
    outer_spec = jax.tree_util.tree_map(lambda _: P(), outer)
    micro_spec = {k: P(None, *data) for k in micro}
    run = jax.shard_map(
        program,
        mesh=mesh,
        in_specs=(layer_spec, outer_spec, micro_spec, P()),
        out_specs=(P(), layer_spec, outer_spec, P(AXIS)),
        axis_names={AXIS, *data},
        check_vma=False,
    )
    loss, g_layers, g_outer, trace = run(layers, outer, micro, count)
    return loss, count, {**g_outer, key: g_layers}, trace
