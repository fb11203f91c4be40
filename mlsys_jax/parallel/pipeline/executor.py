"""Run a pipeline schedule as one SPMD program: a loop over the schedule's ticks inside a
``shard_map`` over the ``pipeline`` mesh axis (and ``data``, see below); the other axes (``fsdp``,
``tensor``) stay with the partitioner, which shards each stage's work over them.

Each device holds its stage's layers. At every tick it does the work its cell of the table names,
chosen with ``lax.switch`` (one branch runs, not all of them masked), and then activations move
one stage on and their gradients one stage back with ``ppermute``. A forward keeps only its stage
input, in the slot the schedule assigns; the backward recomputes the stage from it (per-stage
rematerialisation), so 1F1B holds O(p) microbatch inputs where GPipe holds m. A split backward
(ZB-H1) computes the input gradient at B, keeps the output gradient, and differentiates the
weights at W. Weight gradients accumulate in fp32 in each stage's own slice.

Interleaving (``v`` chunks per device): the stored layers stay in model order, each device holding
a contiguous ``L/p``; the program first moves chunk ``g`` (layers ``g*L/vp ..``) to device
``g % p`` with ``v*v`` permutes of one chunk each, runs, and moves the gradients back the same way.
No device ever holds more than its ``L/p`` layers.

The embedding and the head are replicated along ``pipeline``: the first chunk embeds, the last
computes the loss, and their gradients are summed over the axis once at the end. Replicating
them costs two small matrices per stage and keeps every stage's program the same shape (placing
them on the end stages would make those stages' ticks longer and the others wait for them).

The loss is token-weighted over all microbatches, so ``loss_sum / count`` and the gradients equal
the unpipelined ones. The program also returns the (stage, tick) trace of the work it ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mlsys_jax.models.base import UNPLACED, LanguageModel, Layout, default_positions, run_layers
from mlsys_jax.parallel.pipeline.schedule import Schedule, ScheduleError, check_layers, forward_only

AXIS = "pipeline"
DATA = "data"
IDLE, FORWARD, BACKWARD, WEIGHT = 0, 1, 2, 3
STASH_KINDS = ("inputs", "residuals")
FORWARD_ONLY = "nothing"  # what an evaluation keeps: no backward follows


@dataclasses.dataclass(frozen=True)
class Tables:
    """The schedule as arrays the program indexes by (tick, stage): what to run, for which
    microbatch and local chunk, in which stash slot; and where a message that arrives after the
    tick is kept until its work reads it (``*_store``: -1 when nothing arrives) and where that work
    reads it (``*_read``). Messages wait in slots because a stage may be busy with other work when
    one arrives (1F1B's steady state), and slots, not one buffer per microbatch, keep that O(p)."""

    kind: np.ndarray
    microbatch: np.ndarray
    chunk: np.ndarray
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
        kinds = {"F": FORWARD, "B": BACKWARD, "W": WEIGHT}
        shape = (schedule.ticks, schedule.stages)
        kind, micro, chunk = (np.zeros(shape, np.int32) for _ in range(3))
        when: dict[tuple[str, int, int], int] = {}
        for t, row in enumerate(schedule.grid):
            for s, work in enumerate(row):
                if work is not None:
                    kind[t, s], micro[t, s] = kinds[work.kind], work.microbatch
                    chunk[t, s] = schedule.local_chunk(work.chunk)
                    when[(work.kind, work.microbatch, work.chunk)] = t
        slot = np.maximum(np.asarray(schedule.slots(), np.int32), 0)
        last, at = schedule.chunks - 1, schedule.device_of
        fwd = _mailbox(
            shape, [(when[("F", j, g - 1)], t, at(g)) for (k, j, g), t in when.items() if k == "F" and g > 0]
        )
        bwd = _mailbox(
            shape, [(when[("B", j, g + 1)], t, at(g)) for (k, j, g), t in when.items() if k == "B" and g < last]
        )
        return cls(kind, micro, chunk, slot, max(schedule.peak_stash, 1), *fwd, *bwd)

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


def _chunk_moves(p: int, v: int, inverse: bool = False) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(contiguous position a, interleaved chunk c, device pairs) for every permute that takes
    chunk g from device g // v (position g % v) to device g % p (local chunk g // p)."""
    moves = []
    for a in range(v):
        for c in range(v):
            pairs = [(g // v, d) for d in range(p) if (g := c * p + d) % v == a]
            if pairs:
                moves.append((a, c, [(b, a_) for a_, b in pairs] if inverse else pairs))
    return moves


def _interleave(layers: Any, p: int, v: int) -> Any:
    """A device's contiguous ``(L/p, ...)`` layers as its ``(v, L/vp, ...)`` interleaved chunks."""

    def move(a: jax.Array) -> jax.Array:
        blocks = a.reshape(v, a.shape[0] // v, *a.shape[1:])
        if v == 1:
            return blocks
        out = [jnp.zeros_like(blocks[0]) for _ in range(v)]
        for pos, c, pairs in _chunk_moves(p, v):
            out[c] = out[c] + jax.lax.ppermute(blocks[pos], AXIS, pairs)
        return jnp.stack(out)

    return jax.tree_util.tree_map(move, layers)


def _deinterleave(chunks: Any, p: int, v: int) -> Any:
    """The inverse of ``_interleave``: ``(v, L/vp, ...)`` chunks back to contiguous ``(L/p, ...)``."""

    def move(a: jax.Array) -> jax.Array:
        if v > 1:
            out = [jnp.zeros_like(a[0]) for _ in range(v)]
            for pos, c, pairs in _chunk_moves(p, v, inverse=True):
                out[pos] = out[pos] + jax.lax.ppermute(a[c], AXIS, pairs)
            a = jnp.stack(out)
        return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])

    return jax.tree_util.tree_map(move, chunks)


def without(spec: Any, axes: tuple[str, ...]) -> P:
    """``spec`` with ``axes`` taken out of every entry (an entry left empty becomes None)."""

    def keep(entry: Any) -> Any:
        named = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in named if a not in axes)
        return kept[0] if len(kept) == 1 else (kept or None)

    return P(*(keep(e) for e in spec))


def inside_layout(layout: Layout, manual: tuple[str, ...]) -> Layout:
    """The plan's activation placement as seen inside the program: the manual axes dropped from
    every spec (each device already holds its own rows), constraints on the context mesh, and no
    per-shard kernels (a kernel sees the device's whole activation)."""
    if layout.spec is None:
        return UNPLACED
    spec_of = layout.spec

    def constrain(x: jax.Array, logical_axes: Any, name: str = "<activation>") -> jax.Array:
        spec = spec_of(logical_axes, None, name)  # x's manual dims are already per device
        return jax.lax.with_sharding_constraint(x, without(spec, manual))

    return Layout(constrain=constrain)


def gathered_specs(param_specs: dict[str, Any], layers_key: str, axis: str = "fsdp") -> dict[str, Any]:
    """``stage_specs`` that hold every weight gathered over ``axis`` (other axes kept): the
    parameters' specs without it, the stacked ones also without their layers dim."""

    def each(tree: Any, lead: int) -> Any:
        drop = lambda sp: without(P(*tuple(sp)[lead:]), (axis,))
        return jax.tree_util.tree_map(drop, tree, is_leaf=lambda x: isinstance(x, P))

    return {k: each(v, 1 if k == layers_key else 0) for k, v in param_specs.items()}


def check_pipeline(model: LanguageModel, schedule: Schedule, mesh_sizes: dict[str, int], rows: int) -> None:
    """Refuse counts the executor cannot run, before anything is traced: a schedule for another
    pipeline size, layers that do not cut into the schedule's chunks, a batch that does not split
    into microbatches over the data replicas."""
    p, m = schedule.stages, schedule.microbatches
    axis = mesh_sizes.get(AXIS, 1)
    if axis != p:
        raise ScheduleError(
            f"the schedule has {p} stages but the mesh's pipeline axis is {axis}. Fix: build "
            f"the schedule for {axis} stages, or a mesh with pipeline={p}."
        )
    check_layers(model.num_layers, p, schedule.virtual)
    replicas = mesh_sizes.get(DATA, 1)
    if rows % (m * replicas):
        fits = m * replicas
        raise ScheduleError(
            f"a batch of {rows} rows cannot be split into {m} microbatches over {replicas} data replica(s): it "
            f"must be a multiple of {m} x {replicas} = {fits}. Fix: a batch of {max(fits, rows // fits * fits)} "
            f"or {(rows // fits + 1) * fits}, or another microbatch count."
        )


def pipeline_loss_and_grads(
    model: LanguageModel,
    schedule: Schedule,
    params: Any,
    batch: dict[str, jax.Array],
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    layout: Layout = UNPLACED,
    keep: str = "inputs",
    stage_specs: Any = None,
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """(loss_sum, token count, gradients of loss_sum / count, executed trace) of ``batch``, run
    by ``schedule`` over the mesh's ``pipeline`` axis. The trace is (stages, ticks, 3): the kind
    (0 idle, 1 F, 2 B, 3 W), microbatch and local chunk of what each stage ran at each tick.
    ``keep`` is what a forward stashes for its backward: ``"inputs"`` (the chunk's input; the
    backward recomputes the chunk) or ``"residuals"`` (everything the backward needs: no
    recompute, memory per stashed microbatch a whole chunk's activations). ``stage_specs``, a
    ``PartitionSpec`` per parameter (a stacked weight's over its per-layer dims), holds the weights
    so for the whole step (e.g. without ``fsdp``: gathered once, not inside every tick); None
    leaves them to the partitioner."""
    if keep not in STASH_KINDS:
        raise ScheduleError(f"keep={keep!r} is not one of {STASH_KINDS}")
    return _execute(model, schedule, params, batch, mesh, layout, keep, stage_specs)


def pipeline_loss(
    model: LanguageModel,
    schedule: Schedule,
    params: Any,
    batch: dict[str, jax.Array],
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    layout: Layout = UNPLACED,
) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, token count) of ``batch`` from the forwards of ``schedule`` alone: evaluation
    with each device holding only its stage's layers, nothing stashed, no gradients."""
    loss, count, _, _ = _execute(model, forward_only(schedule), params, batch, mesh, layout, FORWARD_ONLY)
    return loss, count


def _execute(
    model: LanguageModel,
    schedule: Schedule,
    params: Any,
    batch: dict[str, jax.Array],
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    layout: Layout,
    keep: str,
    stage_specs: Any = None,
) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    p, m, v = schedule.stages, schedule.microbatches, schedule.virtual
    check_pipeline(model, schedule, dict(mesh.shape), batch["inputs"].shape[0])
    key = model.layers_key
    tables = Tables.of(schedule)
    micro = split_microbatches(batch, m)
    count = jnp.sum(batch["mask"].astype(jnp.float32))
    layers, outer = params[key], {k: v_ for k, v_ in params.items() if k != key}
    # The data axis is manual too: its replicas then run their ticks with no collective inside a
    # branch (each replica sums its own rows) and add their gradients once at the end. A runtime
    # may not let devices that took different branches meet in a collective.
    data = (DATA,) if mesh.shape.get(DATA, 1) > 1 else ()
    body_layout = inside_layout(layout, (AXIS, *data))

    def program(layers: Any, outer: Any, micro: dict[str, jax.Array], count: jax.Array):
        s = jax.lax.axis_index(AXIS)
        chunks = _interleave(layers, p, v)
        if stage_specs is not None:  # held as the specs say for the whole step
            hold = lambda tree, specs, lead: jax.tree_util.tree_map(
                lambda a, spec: jax.lax.with_sharding_constraint(a, P(*lead, *spec)), tree, specs
            )
            chunks = hold(chunks, stage_specs[key], (None, None))  # (v, L/vp, *per-layer dims)
            outer = hold(outer, {k: stage_specs[k] for k in outer}, ())
        tokens0 = micro["inputs"][0]
        positions = default_positions(tokens0)
        x_like = jax.eval_shape(lambda: model.embed(outer, tokens0, positions, body_layout))
        zeros_x = jnp.zeros(x_like.shape, x_like.dtype)
        training = keep != FORWARD_ONLY

        def f32(tree: Any) -> Any:
            """Zero fp32 gradients shaped like ``tree`` (none at all when only evaluating)."""
            return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), tree) if training else ()

        table = {
            name: jnp.asarray(getattr(tables, name))
            for name in ("kind", "microbatch", "chunk", "slot", "fwd_store", "fwd_read", "bwd_store", "bwd_read")
        }

        def wide(tree: Any) -> Any:
            return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), tree)

        def embed(outer: Any, i: jax.Array, dtype: Any) -> jax.Array:
            """Microbatch ``i``'s tokens embedded: the first chunk's input (only its stage pays)."""
            return model.embed(outer, micro["inputs"][i], positions, body_layout).astype(dtype)

        def chunk_fn(i: jax.Array, first: jax.Array, last: jax.Array) -> Any:
            """A chunk of microbatch ``i`` as a function of (outer, layers, input): the first
            chunk embeds its tokens instead, the last adds its loss sum; what a backward
            differentiates."""

            def through(outer: Any, layers: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
                x = jax.lax.cond(first, lambda: embed(outer, i, x.dtype), lambda: x)
                y = run_layers(model, layers, x, positions, body_layout)[0]

                def head() -> jax.Array:
                    params = {**outer, key: layers}
                    return model.loss(params, y, micro["targets"][i], micro["mask"][i], body_layout)[0]

                return y, jax.lax.cond(last, head, lambda: jnp.zeros((), jnp.float32))

            return through

        # With stashed residuals a forward keeps what its backward needs (jax.vjp's residuals,
        # all but the weights, which every microbatch shares), so the backward does not recompute.
        # A probe trace finds their shapes and which of them are the weights themselves.
        own_like = jax.tree_util.tree_map(lambda a: a[0], chunks)
        probe: dict[str, Any] = {}

        def residuals_of(outer: Any, own: Any, x: jax.Array, i: jax.Array, first: jax.Array, last: jax.Array):
            _, pull = jax.vjp(chunk_fn(i, first, last), outer, own, x)
            leaves, probe["tree"] = jax.tree_util.tree_flatten(pull)
            weights = {id(w): n for n, w in enumerate(jax.tree_util.tree_leaves((outer, own)))}
            probe["weights"] = {n: weights[id(r)] for n, r in enumerate(leaves) if id(r) in weights}
            return [r for n, r in enumerate(leaves) if n not in probe["weights"]]

        if keep == "residuals":
            stash_like = jax.eval_shape(
                residuals_of, outer, own_like, x_like, jnp.int32(0), jnp.bool_(False), jnp.bool_(False)
            )
        else:
            stash_like = [x_like] if training else []

        def pullback(entry: Any, outer: Any, own: Any) -> Any:
            """The stashed residuals, with the current weights put back, as the chunk's vjp."""
            weights, rest = jax.tree_util.tree_leaves((outer, own)), iter(entry)
            total = probe["tree"].num_leaves
            leaves = [weights[probe["weights"][n]] if n in probe["weights"] else next(rest) for n in range(total)]
            return jax.tree_util.tree_unflatten(probe["tree"], leaves)

        def tick(carry, t):
            recv_f, recv_b, stash, cots, g_chunks, g_outer, loss = carry
            at = {name: a[t, s] for name, a in table.items()}
            k, i, c, slot = at["kind"], at["microbatch"], at["chunk"], at["slot"]
            first, last = (s == 0) & (c == 0), (s == p - 1) & (c == v - 1)
            own = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, c, 0, keepdims=False), chunks)
            fwd_in = jax.lax.dynamic_index_in_dim(recv_f, at["fwd_read"], 0, keepdims=False)
            bwd_in = jax.lax.dynamic_index_in_dim(recv_b, at["bwd_read"], 0, keepdims=False)

            def read() -> tuple[jax.Array, ...]:
                """The stash entry at this tick's slot, read inside the branch that needs it and
                handed back as the branch's entry, so one buffer serves both."""
                return tuple(jax.lax.dynamic_index_in_dim(b, slot, 0, keepdims=False) for b in stash)

            held_cot = jax.lax.dynamic_index_in_dim(cots, jnp.minimum(slot, cots.shape[0] - 1), 0, keepdims=False)
            cot_loss = jnp.where(last, 1.0 / count, 0.0).astype(jnp.float32)
            through = chunk_fn(i, first, last)
            no_grads = (f32(own), f32(outer))
            nothing = jnp.zeros((), jnp.float32)

            def vjp_of_held(held: tuple[jax.Array, ...]) -> Any:
                if keep == "residuals":
                    return pullback(held, outer, own)
                return jax.vjp(through, outer, own, held[0])[1]

            # Each branch returns (stash entry, kept output gradient, sent forward, sent back,
            # chunk gradient, outer gradient, loss gained): small pieces; the carried buffers
            # are updated in place after the switch.
            def idle(_):
                return read(), held_cot, zeros_x, zeros_x, *no_grads, nothing

            def forward(_):
                if keep == "residuals":
                    (y, gain), pull = jax.vjp(through, outer, own, fwd_in)
                    leaves = jax.tree_util.tree_leaves(pull)
                    entry = tuple(r for n, r in enumerate(leaves) if n not in probe["weights"])
                    return entry, held_cot, y, zeros_x, *no_grads, gain
                x = jax.lax.cond(first, lambda: embed(outer, i, fwd_in.dtype), lambda: fwd_in)
                y, gain = through(outer, own, x)
                return ((x,) if training else ()), held_cot, y, zeros_x, *no_grads, gain

            def backward(_):
                held = read()
                cot_y = jnp.where(last, zeros_x, bwd_in.astype(zeros_x.dtype))
                if schedule.split_backward:  # B: the input gradient only; W comes later
                    if keep == "residuals":
                        dx = vjp_of_held(held)((cot_y, cot_loss))[2]
                    else:
                        _, pull = jax.vjp(lambda x: through(outer, own, x), held[0])
                        (dx,) = pull((cot_y, cot_loss))
                    return held, cot_y, zeros_x, dx, *no_grads, nothing
                d_outer, d_own, dx = vjp_of_held(held)((cot_y, cot_loss))
                return held, held_cot, zeros_x, dx, wide(d_own), wide(d_outer), nothing

            def weight(_):
                held = read()
                if keep == "residuals":
                    d_outer, d_own, _ = vjp_of_held(held)((held_cot, cot_loss))
                else:
                    _, pull = jax.vjp(lambda outer, layers: through(outer, layers, held[0]), outer, own)
                    d_outer, d_own = pull((held_cot, cot_loss))
                return held, held_cot, zeros_x, zeros_x, wide(d_own), wide(d_outer), nothing

            branches = (idle, forward, backward, weight) if schedule.split_backward else (idle, forward, backward)
            branches = branches if training else (idle, forward)
            keep_x, keep_cot, send_f, send_b, d_own, d_outer, gain = jax.lax.switch(k, branches, None)
            stash = tuple(jax.lax.dynamic_update_index_in_dim(b, e, slot, 0) for b, e in zip(stash, keep_x))
            if schedule.split_backward:
                cots = jax.lax.dynamic_update_index_in_dim(cots, keep_cot, slot, 0)
            g_chunks = jax.tree_util.tree_map(
                lambda g, d: jax.lax.dynamic_update_index_in_dim(g, g[c] + d, c, 0), g_chunks, d_own
            )
            g_outer = jax.tree_util.tree_map(jnp.add, g_outer, d_outer)
            ring = v > 1  # interleaved chunks wrap from the last device to the first
            fwd_pairs = [(j, (j + 1) % p) for j in range(p if ring else p - 1)]
            got_f = jax.lax.ppermute(send_f, AXIS, fwd_pairs)

            def deliver(box: jax.Array, got: jax.Array, where: jax.Array) -> jax.Array:
                kept = jax.lax.dynamic_index_in_dim(box, jnp.maximum(where, 0), 0, keepdims=False)
                return jax.lax.dynamic_update_index_in_dim(
                    box, jnp.where(where >= 0, got, kept), jnp.maximum(where, 0), 0
                )

            recv_f = deliver(recv_f, got_f, at["fwd_store"])
            if training:  # gradients go back only when there is a backward
                got_b = jax.lax.ppermute(send_b, AXIS, [(b, a) for a, b in fwd_pairs])
                recv_b = deliver(recv_b, got_b, at["bwd_store"])
            return (recv_f, recv_b, stash, cots, g_chunks, g_outer, loss + gain), jnp.stack([k, i, c])

        stash = tuple(jnp.zeros((tables.slots, *r.shape), r.dtype) for r in stash_like)
        recv_f = jnp.zeros((tables.fwd_slots, *x_like.shape), x_like.dtype)
        recv_b = jnp.zeros((tables.bwd_slots, *x_like.shape), x_like.dtype)
        # Split backwards keep each microbatch's output gradient from its B until its W.
        cots = jnp.zeros((tables.slots if schedule.split_backward else 1, *x_like.shape), x_like.dtype)
        init = (recv_f, recv_b, stash, cots, f32(chunks), f32(outer), jnp.zeros((), jnp.float32))
        (_, _, _, _, g_chunks, g_outer, loss), trace = jax.lax.scan(tick, init, jnp.arange(schedule.ticks))
        g_layers = _deinterleave(g_chunks, p, v)
        g_outer = jax.lax.psum(g_outer, (AXIS, *data))
        loss = jax.lax.psum(loss, (AXIS, *data))
        if data:
            g_layers = jax.lax.psum(g_layers, data)
        return loss, g_layers, g_outer, trace[None]

    training = keep != FORWARD_ONLY
    layer_spec = jax.tree_util.tree_map(lambda _: P(AXIS), layers)
    outer_spec = jax.tree_util.tree_map(lambda _: P(), outer)
    micro_spec = {k: P(None, *data) for k in micro}
    run = jax.shard_map(
        program,
        mesh=mesh,
        in_specs=(layer_spec, outer_spec, micro_spec, P()),
        out_specs=(P(), layer_spec if training else (), outer_spec if training else (), P(AXIS)),
        axis_names={AXIS, *data},
        check_vma=False,
    )
    loss, g_layers, g_outer, trace = run(layers, outer, micro, count)
    return loss, count, ({**g_outer, key: g_layers} if training else None), trace
