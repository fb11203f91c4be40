"""The collectives a plan's train step runs, from shapes alone: the same ``CollectiveRow``s the
compiled reading gives (``mlsys_jax.analysis.compiled_step``), so ``predict`` prices them
unchanged, in microseconds rather than a compile.

Per step, for the program ``mlsys_jax.train.step`` builds (``m`` microbatches, ``L`` layers,
``r`` rows of ``s`` tokens per device per microbatch, ``d`` the model width):

- **FSDP** (a weight sharded over an axis that also shards the batch): each layer's weights are
  all-gathered in the forward and again in the backward, per microbatch, in the compute dtype
  (norms in float32); the weights outside the layer stack (embedding, head, final norm) once per
  step (the compiler hoists them out of the loops). Gradients are reduce-scattered over the same
  axes per microbatch, inside the backward's layer loop;
- **data parallelism**: gradients all-reduced per microbatch over each batch or sequence axis that
  does not shard the weight (one all-reduce per axis, as the partitioner emits them; with FSDP on
  the shard the reduce-scatter left). Gradients travel in the compute dtype, except the norms' and
  the embedding table's (its gradient is a float32 scatter-add), which stay float32;
- **tensor parallelism**: ``r x s x d`` activations all-reduced in the compute dtype, 2 per layer
  forward and 2 backward (one more per layer under ``remat="full"``: the recomputed forward's
  first; its second is the layer output, which the backward does not need), one for the
  vocabulary-sharded embedding and one for the head's input gradient, and three float32 ``r x s``
  ones for the vocabulary-sharded log-sum-exp;
- **sequence (context) parallelism**: this toolkit shards the activations' sequence dim over the
  ``sequence`` axis (not Megatron's sequence parallelism over ``tensor``): each layer all-gathers
  its keys and values over it, twice forward and backward (three times under remat), and
  reduce-scatters their gradients in float32; the weights are replicated over ``sequence``, so
  their gradients are all-reduced over it like data parallelism's;
- **pipeline**: every tick permutes one microbatch's ``r x s x d`` activations forward and their
  gradients back; interleaving moves each stage's chunks into place before and their gradients
  back after; the data replicas sum layer gradients once at the end (float32), the stages and
  replicas the embedding's and head's; FSDP inside a stage gathers a chunk's weights in every
  tick that runs it (``pipeline_weights="sharded"``) or once per step (``"gathered"``).

Two readings of the same model:

- ``"executed"`` (the default, what ``predict`` should price): what a GPU or TPU runs;
- ``"compiled"``: what ``analyze`` reads from XLA:CPU's program, to check this model against:
  every floating collective in float32 (XLA:CPU widens narrower ones), a reduce-scatter compiled as
  an all-reduce of the same operand (then sliced), and a collective inside the pipeline's per-tick
  branches counted at every tick (the reading multiplies each branch's ops by the loop's trips).

Measured against ``analyze`` (``tests/test_planner.py``: ``small``, ``tiny`` and ``tiny8`` on 8
devices under dp, fsdp, dp_tp, fsdp_tp with microbatches, fsdp with sequence parallelism, and a
pipeline of fsdp x tensor stages under remat), the ``"compiled"`` reading's bytes per step of each
collective kind over each set of axes land within 10% (most within 0.1%) for every group that
carries at least 1% of the step's bytes. What it leaves out: scalars (the loss, the token count),
the schedule's trace, norm-sized gathers XLA makes in both dtypes, and, where data and FSDP axes
both reduce the embedding table's gradient, XLA's one all-reduce over both where this model has
one per axis (the same traffic, a different kind). At planning sizes the same checks hold on
``7b`` and ``8b`` (fsdp; fsdp with sequence parallelism) except one seen so far: under
``remat="full"`` with tensor parallelism and microbatches, XLA gathers the fused gate/up
projection a third time per layer (``8b`` on ``data=2,fsdp=64,tensor=2``: FSDP gathers 28% above
this model). The planner's confirming compile measures exactly such differences.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from mlsys_jax.analysis.collectives import ring_traffic
from mlsys_jax.analysis.compiled_step import Analysis, CollectiveRow
from mlsys_jax.comm.grad_sync import COST_ALGORITHM, default_slice_size, preset_slice_size
from mlsys_jax.comm.models import cost as comm_cost
from mlsys_jax.meshes import AXIS_NAMES
from mlsys_jax.parallel.errors import PlanError

if TYPE_CHECKING:
    from mlsys_jax.analysis.memory import PlanMemory
    from mlsys_jax.analysis.parts import PlanParts
    from mlsys_jax.models.base import LanguageModel
    from mlsys_jax.parallel.pipeline import Schedule
    from mlsys_jax.parallel.plan import Placement, Plan
    from mlsys_jax.train.config import RunConfig

READINGS = ("executed", "compiled")

#: Mesh axes whose collectives sit on the step's critical path: activations (tensor, sequence)
#: and the pipeline's hand-offs, which the next piece of work waits for. Weight gathers and
#: gradient reductions (fsdp, data) can run behind computation.
EXPOSED_AXES = ("tensor", "sequence", "pipeline")


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One parameter as the step moves it: per-device elements, its layer count on this device
    (0 outside the layer stack), the axes that gather it for use and that reduce its gradient."""

    path: str
    elements: int
    layers: int
    gather: tuple[str, ...]
    reduce: tuple[str, ...]
    gather_bytes: int
    """Itemsize of the gathered copy (the compute dtype; float32 for a norm)."""
    grad_bytes: int
    """Itemsize of the reduced gradient (the compute dtype; float32 for norms and the table)."""


def _flat(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_axes(spec: Any) -> tuple[str, ...]:
    return tuple(a for e in spec for a in _flat(e))


def _ordered(axes: Iterable[str], sizes: dict[str, int]) -> tuple[str, ...]:
    wanted = set(axes)
    return tuple(a for a in AXIS_NAMES if a in wanted and sizes.get(a, 1) > 1)


def _activation_axes(plan: Plan, logical: str) -> tuple[str, ...]:
    spec = plan.activation_spec((logical,))
    return _ordered(_spec_axes(spec), plan.axis_sizes)


def _leaves(placements: list[Placement], plan: Plan, model: LanguageModel, token_axes: tuple[str, ...]) -> list[_Leaf]:
    sizes = plan.axis_sizes
    compute = jnp.dtype(model.compute_dtype).itemsize if model.compute_dtype is not None else None
    out = []
    for p in placements:
        own = set(_spec_axes(p.spec))
        stacked = p.path.split("/")[0] == model.layers_key
        layers = p.shard_shape[0] if stacked else 0
        dims = len(p.shape) - (1 if stacked else 0)
        param = jnp.dtype(p.dtype).itemsize
        narrow = compute if compute is not None and jnp.issubdtype(p.dtype, jnp.floating) else param
        gather = _ordered((a for a in token_axes if a in own), sizes)
        reduce = tuple(a for a in token_axes if a not in own and sizes.get(a, 1) > 1)
        out.append(
            _Leaf(
                path=p.path,
                elements=math.prod(p.shard_shape),
                layers=layers,
                gather=gather,
                reduce=reduce,
                gather_bytes=narrow if dims >= 2 else param,
                grad_bytes=param if dims < 2 or p.path == "embed" else narrow,
            )
        )
    return out


def _model_dims(model: LanguageModel) -> tuple[int, int, int]:
    cfg = model.config
    try:
        return int(cfg.d_model), int(cfg.n_kv_heads), int(cfg.head_dim)
    except AttributeError:
        raise PlanError(
            f"the analytic collectives know Llama-family shapes (d_model, n_kv_heads, head_dim); model "
            f"{model.name!r} has a {type(cfg).__name__} without them. Fix: compile the plan with "
            "mlsys_jax.analysis.analyze instead."
        ) from None


class _Rows:
    """Collects rows, leaving out those over a group of one device."""

    def __init__(self, sizes: dict[str, int], reading: str) -> None:
        self.sizes, self.reading, self.rows = sizes, reading, []

    def add(
        self,
        kind: str,
        itemsize: int,
        payload_elements: float,
        axes: Iterable[str],
        count: int,
        algorithm: str = "xla",
        slice_size: int | None = None,
    ) -> None:
        axes = _ordered(axes, self.sizes)
        group = math.prod(self.sizes[a] for a in axes)
        if group <= 1 or count <= 0 or payload_elements <= 0:
            return
        if self.reading == "compiled":
            itemsize = max(itemsize, 4)
            kind = "all-reduce" if kind == "reduce-scatter" else kind
        payload = int(payload_elements * itemsize)
        dtype = {2: "bf16", 4: "f32", 8: "f64", 1: "s8"}.get(itemsize, f"{8 * itemsize}b")
        if kind == "collective-permute":
            traffic, group = float(payload), 2
        else:
            traffic = ring_traffic(kind, payload, group)
        if algorithm != "xla":
            steps = comm_cost(algorithm, group, payload, inner=slice_size)
            traffic = steps.bytes_per_device
        row = CollectiveRow(kind, dtype, payload, axes, count, (count,), group, traffic, algorithm, slice_size)
        self.rows.append(row)


def step_collectives(
    plan: Plan,
    model: LanguageModel,
    batch: int,
    seq: int,
    microbatches: int = 1,
    schedule: Schedule | None = None,
    pipeline_stash: str = "inputs",
    pipeline_weights: str = "sharded",
    reading: str = "executed",
    placements: list[Placement] | None = None,
    grad_sync: str = "xla",
    sync_slice: int | None = None,
) -> tuple[CollectiveRow, ...]:
    """Every collective one train step runs per device, from shapes (see the module's docstring).
    ``placements`` may pass ``plan.placements(model.specs)`` already computed. With a
    ``grad_sync`` other than ``xla`` the data axis's gradient sums are that algorithm's (once per
    layer and step, see ``train.synced``), priced by its own steps and bytes."""
    if reading not in READINGS:
        raise ValueError(f"reading={reading!r} is not one of {READINGS}")
    sizes = plan.axis_sizes
    d_model, kv_heads, head_dim = _model_dims(model)
    batch_axes = _activation_axes(plan, "batch")
    seq_axes = _activation_axes(plan, "seq")
    tp_axes = _ordered((*_activation_axes(plan, "heads"), *_activation_axes(plan, "mlp")), sizes)
    vocab_axes = _activation_axes(plan, "vocab")
    kv_local = kv_heads // math.prod(sizes[a] for a in _activation_axes(plan, "kv_heads"))
    m = schedule.microbatches if schedule is not None else microbatches
    rows = max(batch // (plan.batch_shards * m), 1)
    seq_local = max(seq // math.prod(sizes[a] for a in seq_axes), 1)
    compute = jnp.dtype(model.compute_dtype).itemsize if model.compute_dtype is not None else 4
    token_axes = _ordered((*batch_axes, *seq_axes), sizes)
    leaves = _leaves(placements if placements is not None else plan.placements(model.specs), plan, model, token_axes)
    out = _Rows(sizes, reading)
    x_elements = rows * seq_local * d_model  # one device's residual stream of a microbatch
    kv_elements = rows * seq * kv_local * head_dim  # one device's keys (or values), gathered
    remat = model.remat != "none"
    ax = _ActAxes(tp_axes, vocab_axes, seq_axes)
    tokens = rows * seq_local
    if schedule is None:
        sync = _Sync(grad_sync, sync_slice) if grad_sync != "xla" else None
        if sync is None:  # a synced-gradient replica keeps the einsums
            ax = dataclasses.replace(ax, ring=_collective_matmul_ring(plan, model, (batch // m, seq, d_model)))
        _unpipelined(out, leaves, m, x_elements, kv_elements, tokens, compute, remat, ax, model.num_layers, sync)
    else:
        _pipelined(
            out, leaves, schedule, x_elements, kv_elements, tokens, compute, remat, ax, pipeline_stash, pipeline_weights
        )
    return tuple(out.rows)


@dataclasses.dataclass(frozen=True)
class _Sync:
    """A ``grad_sync`` of ours: its ``comm.models`` algorithm and the hierarchical slice."""

    grad_sync: str
    slice_size: int | None

    @property
    def algorithm(self) -> str:
        return COST_ALGORITHM[self.grad_sync]


@dataclasses.dataclass(frozen=True)
class _ActAxes:
    tensor: tuple[str, ...]
    vocab: tuple[str, ...]
    sequence: tuple[str, ...]
    ring: int = 0
    """The tensor axis's size when the blocks' projections run as collective matmuls, else 0."""


def _collective_matmul_ring(plan: Plan, model: LanguageModel, residual: tuple[int, int, int]) -> int:
    """The tensor size when the model's ``tp_matmul="collective"`` finds its sequence split for a
    microbatch's residual stream of shape ``residual`` on this plan (``models.tensor_parallel``),
    else 0 (the einsums run)."""
    cfg = model.config
    if getattr(cfg, "tp_matmul", "xla") != "collective":
        return 0
    from mlsys_jax.models import tensor_parallel

    widths = (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff)
    if tensor_parallel.sequence_parallel(plan.layout, residual, widths) is None:
        return 0
    return plan.axis_sizes.get("tensor", 1)


def _activation_rows(
    out: _Rows,
    layer_runs: float,
    tp_per_layer: float,
    kv_gathers_per_layer: float,
    kv_scatters_per_layer: float,
    ends: float,
    x_elements: int,
    kv_elements: int,
    tokens: int,
    compute: int,
    ax: _ActAxes,
) -> None:
    """Tensor and sequence collectives of ``layer_runs`` (layer x microbatch) runs, and the
    embedding's and loss's for ``ends`` microbatches."""
    out.add("all-reduce", compute, x_elements, ax.tensor, round(layer_runs * tp_per_layer))
    out.add("all-reduce", compute, x_elements, ax.vocab, round(2 * ends))
    out.add("all-reduce", 4, tokens, ax.vocab, round(3 * ends))
    out.add("all-gather", compute, kv_elements, ax.sequence, round(layer_runs * kv_gathers_per_layer))
    out.add("reduce-scatter", 4, 2 * kv_elements, ax.sequence, round(layer_runs * kv_scatters_per_layer))


def _unpipelined(
    out: _Rows,
    leaves: list[_Leaf],
    m: int,
    x_elements: int,
    kv_elements: int,
    tokens: int,
    compute: int,
    remat: bool,
    ax: _ActAxes,
    num_layers: int,
    sync: _Sync | None = None,
) -> None:
    sizes = out.sizes
    for leaf in leaves:
        per = leaf.elements // leaf.layers if leaf.layers else leaf.elements
        g = math.prod(sizes[a] for a in leaf.gather)
        if leaf.layers:
            gathers, reductions = 2 * m * leaf.layers, m * leaf.layers
        else:
            gathers, reductions = 1, m
        out.add("all-gather", leaf.gather_bytes, per * g, leaf.gather, gathers)
        out.add("reduce-scatter", leaf.grad_bytes, per * g, leaf.gather, reductions)
        # The table's gradient (a whole-table scatter-add) is all-reduced whole before its scatter.
        whole = per * g if leaf.path == "embed" else per
        for axis in leaf.reduce:
            if sync is not None and axis == "data":
                # Ours: each layer once per step (one microbatch) or each leaf's whole
                # accumulated gradient once (several).
                layers = leaf.layers if leaf.layers and m == 1 else 1
                count, payload = layers, per * (leaf.layers or 1) // layers
                inner = (
                    sync.slice_size or default_slice_size(sizes["data"]) if sync.grad_sync == "hierarchical" else None
                )
                out.add("all-reduce", leaf.grad_bytes, payload, (axis,), count, sync.algorithm, inner)
                continue
            out.add("all-reduce", leaf.grad_bytes, whole, (axis,), reductions)
    if ax.ring:
        # Collective matmuls: per layer 4 rings of n-1 permutes of a 1/n token chunk forward and
        # 4 backward; under remat the recomputed forward runs 3 (the last one's output, the
        # layer's, is not needed). The head gathers the tokens, forward and backward.
        n, layer_runs = ax.ring, m * num_layers
        rings = 8 + (3 if remat else 0)
        out.add("collective-permute", compute, x_elements / n, ax.tensor, round(layer_runs * (n - 1) * rings))
        out.add("all-gather", compute, x_elements, ax.tensor, 2 * m)
    _activation_rows(
        out,
        layer_runs=m * num_layers,
        tp_per_layer=0 if ax.ring else 4 + (1 if remat else 0),
        kv_gathers_per_layer=4 + (2 if remat else 0),
        kv_scatters_per_layer=1,
        ends=m,
        x_elements=x_elements,
        kv_elements=kv_elements,
        tokens=tokens,
        compute=compute,
        ax=ax,
    )


def forward_recomputes(schedule: Schedule | None, remat: bool, pipeline_stash: str = "inputs") -> int:
    """How many extra forward passes the step runs beyond the one that computes the loss: one
    per layer remat; under a pipeline, one for every backward piece (B, and W when split) that
    recomputes its chunk from a stashed input, and one more per piece under remat."""
    if schedule is None:
        return 1 if remat else 0
    pieces = 2 if schedule.split_backward else 1
    from_inputs = pieces if pipeline_stash == "inputs" else 0
    return from_inputs + (pieces if remat else 0)


def _pipelined(
    out: _Rows,
    leaves: list[_Leaf],
    schedule: Schedule,
    x_elements: int,
    kv_elements: int,
    tokens: int,
    compute: int,
    remat: bool,
    ax: _ActAxes,
    stash: str,
    weights: str,
) -> None:
    from mlsys_jax.parallel.pipeline.executor import _chunk_moves

    sizes, p, m, v = out.sizes, schedule.stages, schedule.microbatches, schedule.virtual
    split = schedule.split_backward
    inputs = 1 if stash == "inputs" else 0
    # Weight gathers per layer in each branch: F one; B (and W) one for the backward and one
    # more for the forward it recomputes from a stashed input. The gradient is scattered once.
    gathers = 1 + (1 + inputs) * (2 if split else 1)
    # How often a branch runs per step: as executed, once per microbatch and chunk (the
    # embedding's and head's, once per microbatch); as compiled, at every tick.
    compiled = out.reading == "compiled"
    data = tuple(a for a in ("data",) if sizes.get(a, 1) > 1)
    for leaf in leaves:
        per = leaf.elements // leaf.layers if leaf.layers else leaf.elements
        runs = schedule.ticks if compiled else (m * v if leaf.layers else m)
        chunk_layers = leaf.layers // v if leaf.layers else 1
        g = math.prod(sizes[a] for a in leaf.gather)
        table = leaf.path == "embed" and not leaf.layers
        if weights == "gathered":  # held whole: gathered once for the forwards, once for the backwards
            out.add("all-gather", leaf.gather_bytes, leaf.elements * g, leaf.gather, 2)
        else:
            out.add("all-gather", leaf.gather_bytes, per * g, leaf.gather, runs * chunk_layers * gathers)
        if table:  # its scatter-add gathers the output gradient's rows instead of scattering the table's
            if weights != "gathered":
                out.add("all-gather", 4, x_elements * g, leaf.gather, runs)
        else:
            out.add("reduce-scatter", leaf.grad_bytes, per * g, leaf.gather, runs * chunk_layers)
        for axis in (a for a in leaf.reduce if a not in data):  # e.g. sequence: inside the ticks
            out.add("all-reduce", leaf.grad_bytes, per, (axis,), runs * chunk_layers)
        # Once at the end, in float32: layers over the data replicas, the rest over stages too.
        out.add("all-reduce", 4, leaf.elements, data if leaf.layers else ("pipeline", *data), 1)
        if leaf.layers and v > 1:
            moves = sum(1 for _, _, pairs in _chunk_moves(p, v) if any(s != t for s, t in pairs))
            out.add("collective-permute", compute, leaf.elements // v, ("pipeline",), moves)
            out.add("collective-permute", 4, leaf.elements // v, ("pipeline",), moves)
    runs = schedule.ticks if compiled else m * v
    layers_per_chunk = max((leaf.layers // v for leaf in leaves if leaf.layers), default=0)
    # Per layer, tensor all-reduces: F 2, B 2; each backward piece (B, and W when split) 2 more
    # for the forward it recomputes from a stashed input (the whole forward, its output too) and
    # 1 for a layer remat. Key/value gathers: 2 in each of those.
    pieces = 2 if split else 1
    tp = 4 + pieces * (2 * inputs + (1 if remat else 0))
    kv = 4 + pieces * 2 * (inputs + (1 if remat else 0))
    _activation_rows(
        out,
        layer_runs=runs * layers_per_chunk,
        tp_per_layer=tp,
        kv_gathers_per_layer=kv,
        kv_scatters_per_layer=1,
        ends=(schedule.ticks if compiled else m) * (1 + inputs),
        x_elements=x_elements,
        kv_elements=kv_elements,
        tokens=tokens,
        compute=compute,
        ax=ax,
    )
    out.add("collective-permute", compute, x_elements, ("pipeline",), 2 * schedule.ticks)


def collectives_of(
    cfg: RunConfig, reading: str = "executed", parts: PlanParts | None = None, placements: Any = None
) -> tuple[CollectiveRow, ...]:
    """``step_collectives`` of the run a recipe's settings describe."""
    from mlsys_jax.analysis.parts import plan_parts

    p = parts if parts is not None else plan_parts(cfg)
    d = cfg.data
    return step_collectives(
        p.plan,
        p.model,
        d.batch,
        d.seq,
        d.microbatches,
        p.schedule,
        cfg.mesh.pipeline_stash,
        cfg.mesh.pipeline_weights,
        reading,
        placements=placements,
        grad_sync=cfg.mesh.grad_sync,
        sync_slice=preset_slice_size(p.preset),
    )


def analytic_analysis(
    cfg: RunConfig,
    parts: PlanParts,
    memory: PlanMemory,
    rows: tuple[CollectiveRow, ...],
    hardware: str | None = None,
) -> Analysis:
    """The ``Analysis`` ``predict`` prices, from shapes alone: the plan's memory, FLOPs and bubble
    and the analytic collectives ``rows`` (nothing compiled, so no bytes accessed)."""
    from mlsys_jax.analysis.compiled_step import ANALYTIC, analysis_of

    return analysis_of(cfg, parts, memory, None, rows, (ANALYTIC,), hardware)


def bytes_by_kind(rows: Iterable[CollectiveRow]) -> dict[tuple[str, tuple[str, ...]], int]:
    """Payload bytes per step by (kind, mesh axes)."""
    out: dict[tuple[str, tuple[str, ...]], int] = {}
    for r in rows:
        key = (r.kind, tuple(r.axes))
        out[key] = out.get(key, 0) + r.count * r.payload_bytes
    return out


def is_exposed(row: CollectiveRow) -> bool:
    """Whether a collective waits on the critical path (see ``EXPOSED_AXES``)."""
    return any(a in EXPOSED_AXES for a in row.axes)


__all__ = [
    "EXPOSED_AXES",
    "READINGS",
    "analytic_analysis",
    "bytes_by_kind",
    "collectives_of",
    "forward_recomputes",
    "is_exposed",
    "step_collectives",
]
