"""The auto-planner behind ``mlsys-jax plan --auto``: every way to lay a model out on N devices,
ranked by predicted step time, the best few confirmed by compiling them.

1. **Enumerate** every factorization of the devices into ``pipeline x data x fsdp x sequence x
   tensor`` the model can take (tensor divides the query and key/value heads, pipeline the
   layers, sequence the sequence length, the global batch the batch-sharding axes times the
   microbatches), each with its strategy preset (``dp``, ``fsdp``, ``dp_fsdp_tp``, ``pp_...``,
   ``--sequence-parallel`` when ``sequence > 1``); unpipelined with 1, 2 or 4 microbatches,
   pipelined with ``p``, ``2p`` or ``4p`` under 1F1B, interleaved (2 virtual stages) and ZB-H1;
   ``remat`` none or full, and for a pipeline what its forwards stash (inputs or residuals).
   Settings the toolkit refuses (``PlanError``, ``ConfigError``, ``MeshError`` ...) are skipped
   and counted by reason.
2. **Rank analytically**: memory from the memory model's own ``plan_memory`` (schedules,
   traced activations and state bytes are each computed once per distinct input and cached
   where they are made), collectives from shapes (``mlsys_jax.analysis.analytic``), priced by
   ``predict`` on the hardware preset. Plans that do not fit the device's HBM are dropped (the
   fastest of them, and the leanest, are kept to say what memory cost). A factorization whose
   state alone exceeds HBM is refused before its activations are traced. The **step time**
   ranked is neither the serial nor the perfectly overlapped one:
   weight gathers and gradient reductions (``fsdp``, ``data``) run behind computation, as XLA's
   latency-hiding scheduler prefetches them, but activation collectives (``tensor``,
   ``sequence``) and the pipeline's hand-offs sit on the critical path::

       step = (max(compute, hidden communication) + exposed communication) / (1 - bubble)

   ``compute`` is the model's FLOPs at peak plus the forwards the plan recomputes (a third of
   the step's FLOPs each: ``remat="full"``, a pipeline backward that recomputes its chunk from a
   stashed input). Before compiling nothing prices HBM traffic, so a compute-bound plan's MFU is
   its recompute's alone: an upper bound. Steps within 0.1% tie (typically all compute-bound);
   among them a plan leaving 10% of HBM free goes first (the memory model is good to about 15%),
   then the one with less communication to hide.
3. **Confirm** the best ``confirm`` by compiling each with ``analyze`` (a subprocess simulating
   the devices when the mesh is larger than this process's): a plan that fails to compile is
   dropped; the others are re-ranked by the compiled prediction, in which the analytic
   communication is scaled by how far the compiled collectives differ from the analytic ones
   read the same way (``reading="compiled"``: XLA:CPU's float32, all-reduce for reduce-scatter,
   see ``analytic``), on the exposed and hidden parts separately. XLA:CPU's bytes accessed are
   shown, not ranked (an upper bound an accelerator compiler fuses down).

**Links** for a factorization other than the preset's own: devices lie in row-major mesh order,
each slice of a multi-slice preset a contiguous block, so an axis crosses the data-centre network
exactly when its groups span more than one slice (on ``tpu-v5e-2x256``, the outermost axis of
size 2 or more); every other axis takes the preset's in-slice link (ICI, NVLink). On a
single-slice preset every axis takes its one link (``gpu-h100x8``: NVLink; ``tpu-v5p-64``: one
torus axis's ICI, which makes FSDP over all 32 chips look as slow as over one torus axis: the
planner is conservative there).

**Default batch**: one sequence of ``seq`` tokens per device (``batch = devices``): the smallest
batch every factorization can split, and ``seq`` tokens per chip per step, above the ~2,500 where
data or FSDP parallelism turns compute-bound on TPU v5p at the default 4,096.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mlsys_jax.analysis.analytic import analytic_analysis, collectives_of, is_exposed
from mlsys_jax.analysis.compiled_step import CollectiveRow
from mlsys_jax.analysis.memory import PlanMemory, memory_of
from mlsys_jax.analysis.prediction import Prediction, link_for, predict, row_time
from mlsys_jax.meshes import AXIS_NAMES, MeshAxis, MeshPreset, PresetError, load_preset
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.memory import human_bytes, plan_key
from mlsys_jax.params import specs_key

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from mlsys_jax.analysis.parts import PlanParts
    from mlsys_jax.train.config import RunConfig

#: The sequence length planned when none is given.
DEFAULT_SEQ = 4096
#: The mesh axes a factorization spreads devices over, outermost first.
PLAN_AXES = ("pipeline", "data", "fsdp", "sequence", "tensor")
#: Microbatch counts: unpipelined, and per pipeline stage.
MICROBATCHES = (1, 2, 4)
STAGE_MICROBATCHES = (1, 2, 4)
SCHEDULES = ("1f1b", "interleaved", "zb")
#: (remat, pipeline stash) pairs tried: unpipelined, pipelined.
REMATS = (("none", "inputs"), ("full", "inputs"))
PIPELINE_REMATS = (("none", "inputs"), ("none", "residuals"), ("full", "inputs"), ("full", "residuals"))
#: How many candidates the table and the ``why`` cover.
TOP = 5
#: Candidates that do not fit kept to say what memory cost the winner (and the leanest of them).
UNFIT_KEPT = 5
#: Step times within this share are a tie, broken by memory headroom, then the serial time.
TIE = 1e-3
#: The share of HBM a tied plan should leave free to rank before one that does not.
HEADROOM = 0.1


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """What compiling a candidate said: its compile time, how its collectives compare with the
    analytic ones read as compiled (time on the same links, hidden and exposed), and the step
    predicted from them; or the error when it did not compile."""

    seconds: float
    hidden_ratio: float = 1.0
    exposed_ratio: float = 1.0
    bytes_ratio: float = 1.0
    """Payload bytes per step compiled over the analytic model's read as compiled."""
    analytic_step_s: float = 0.0
    """The step predicted before compiling."""
    bytes_accessed_s: float = 0.0
    """XLA:CPU's bytes accessed at the device's HBM bandwidth (shown, not ranked)."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One plan: its recipe flags, memory, predicted step by part and, for the best few, what
    compiling it said. ``why`` is set for the top five."""

    flags: dict[str, Any]
    sizes: dict[str, int]
    memory: PlanMemory
    prediction: Prediction
    hidden_s: float
    exposed_s: float
    comm_by_axis: dict[str, float]
    recomputes: int
    confirmed: Confirmation | None = None
    why: str = ""

    @property
    def fits(self) -> bool:
        return self.memory.fits is not False

    @property
    def compute_s(self) -> float:
        return max(self.prediction.compute_s, self.prediction.memory_s)

    @property
    def bubble(self) -> float:
        return self.prediction.bubble

    @property
    def step_s(self) -> float:
        """The step time ranked (see the module's docstring): with the compiled communication
        once confirmed (``hidden_s`` and ``exposed_s`` then scaled), the analytic one before."""
        return (max(self.compute_s, self.hidden_s) + self.exposed_s) / (1 - self.bubble)

    @property
    def serial_s(self) -> float:
        return (self.compute_s + self.hidden_s + self.exposed_s) / (1 - self.bubble)

    @property
    def mfu(self) -> float:
        p = self.prediction
        return p.model_flops / (p.devices * p.peak_flops * self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.prediction.tokens / self.step_s

    @property
    def tokens_per_chip(self) -> float:
        """Tokens per device per step."""
        return self.prediction.tokens / self.prediction.devices

    def parts(self) -> dict[str, float]:
        """Seconds each part adds to the step (they sum to it): compute, communication the
        computation does not hide, and the bubble."""
        base = max(self.compute_s, self.hidden_s) + self.exposed_s
        step = self.step_s
        scale = step * (1 - self.bubble) / base if base else 1.0
        return {
            "compute": self.compute_s * scale,
            "communication": (max(self.hidden_s - self.compute_s, 0.0) + self.exposed_s) * scale,
            "bubble": step * self.bubble,
        }

    def label(self) -> str:
        f = self.flags
        parts = [mesh_text(self.sizes), f["strategy"]]
        if self.sizes.get("pipeline", 1) > 1:
            v = f"x{f['virtual_stages']}" if f.get("virtual_stages", 1) > 1 else ""
            parts.append(f"{f['schedule']}{v} m={f['microbatches']} stash={f['pipeline_stash']}")
        elif f["microbatches"] > 1:
            parts.append(f"m={f['microbatches']}")
        parts.append(f"remat={f['remat']}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class PlannerResult:
    """Every candidate that fits, best first; of those that do not, the fastest, the leanest and
    the nearest to fitting of those faster than the winner; how many settings were tried and
    why the rest were refused; and how long each pass took."""

    model: str
    devices: int
    hardware: str
    batch: int
    seq: int
    default_batch: bool
    candidates: tuple[Candidate, ...]
    unfit: tuple[Candidate, ...]
    enumerated: int
    refused: dict[str, int]
    outcomes: dict[str, dict[str, int]]
    """Per factorization (``mesh_text``): how many of its settings fit, did not, or were refused
    and why."""
    analytic_s: float
    confirm_s: float
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def winner(self) -> Candidate:
        if not self.candidates:
            best = min(self.unfit, key=lambda c: c.memory.total, default=None)
            need = f" the leanest needs {best.memory.describe()}" if best is not None else ""
            raise PlanError(
                f"no plan of {self.model} on {self.devices} devices of {self.hardware} fits in device memory "
                f"(batch {self.batch} x {self.seq} tokens):{need}. Fix: more devices, a smaller --batch or "
                "--seq, or leaner kernels (--attention-impl pallas, --loss-impl fused)."
            )
        return self.candidates[0]

    def top(self, n: int = TOP) -> tuple[Candidate, ...]:
        return self.candidates[:n]

    @property
    def seconds(self) -> float:
        return self.analytic_s + self.confirm_s

    def winner_flags(self) -> str:
        """The winner as a command line ``recipes/train_lm.py`` accepts."""
        return flag_line(self.winner.flags)

    def describe_batch(self) -> str:
        how = " (default: one sequence per device)" if self.default_batch else ""
        return (
            f"global batch {self.batch} sequences x {self.seq} tokens{how}: "
            f"{self.batch * self.seq // self.devices:,} tokens per device per step"
        )

    def to_json(self) -> dict[str, Any]:
        def row(c: Candidate) -> dict[str, Any]:
            return {
                "flags": c.flags,
                "command": flag_line(c.flags),
                "memory_bytes": c.memory.total,
                "hbm_share": c.memory.share,
                "compute_s": c.compute_s,
                "hidden_comm_s": c.hidden_s,
                "exposed_comm_s": c.exposed_s,
                "comm_by_axis_s": c.comm_by_axis,
                "bubble": c.bubble,
                "recomputes": c.recomputes,
                "step_s": c.step_s,
                "serial_s": c.serial_s,
                "mfu": c.mfu,
                "tokens_per_s": c.tokens_per_s,
                "tokens_per_chip": c.tokens_per_chip,
                "confirmed": dataclasses.asdict(c.confirmed) if c.confirmed is not None else None,
                "why": c.why,
            }

        return {
            "model": self.model,
            "devices": self.devices,
            "hardware": self.hardware,
            "batch": self.batch,
            "seq": self.seq,
            "default_batch": self.default_batch,
            "enumerated": self.enumerated,
            "fitting": len(self.candidates),
            "refused": self.refused,
            "unfit": sum(o.get("does not fit", 0) for o in self.outcomes.values()),
            "analytic_s": self.analytic_s,
            "confirm_s": self.confirm_s,
            "winner": flag_line(self.winner.flags) if self.candidates else None,
            "top": [row(c) for c in self.top()],
            "fastest_unfit": [row(c) for c in self.unfit],
        }


# ---- hardware -------------------------------------------------------------------------------


def hardware_for(preset: MeshPreset, sizes: dict[str, int]) -> MeshPreset:
    """``preset``'s device and links laid out as ``sizes`` (see the module's docstring: an axis
    crosses the slower inter-slice link when its groups span slices, else the in-slice link)."""
    devices = math.prod(sizes.values())
    per_slice = preset.num_devices // preset.num_slices
    slices = 1 if devices <= per_slice else devices // per_slice
    if devices > per_slice and devices % per_slice:
        raise PresetError(
            f"{devices} devices do not make whole slices of {per_slice} on {preset.name!r}. Fix: a multiple of {per_slice}."
        )
    inner_links = [a.link for a in preset.axes if a.slices == 1]
    outer_links = [a.link for a in preset.axes if a.slices > 1]
    fastest = max(preset.links, key=lambda n: (preset.links[n].bandwidth, -preset.links[n].latency))
    inner = inner_links[0] if inner_links else fastest
    outer = outer_links[0] if outer_links else inner
    axes, stride = [], devices
    for name in AXIS_NAMES:
        n = sizes.get(name, 1)
        if n <= 1:
            continue
        stride //= n  # devices between neighbours along this axis (row-major)
        crosses = slices > 1 and stride * n > per_slice
        span = min(slices, max(stride * n // per_slice, 1)) if crosses else 1
        axes.append(MeshAxis(name, n, outer if crosses else inner, span if n % span == 0 else 1))
    if not axes:
        axes.append(MeshAxis("data", 1, inner))
    return dataclasses.replace(preset, name=f"{preset.name}[{mesh_text(sizes)}]", axes=tuple(axes))


# ---- enumeration ----------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(devices: int, axes: tuple[str, ...] = PLAN_AXES) -> Iterator[dict[str, int]]:
    """Every way to write ``devices`` as a product of one size per axis (ordered)."""
    if not axes:
        if devices == 1:
            yield {}
        return
    for d in divisors(devices):
        for rest in factorizations(devices // d, axes[1:]):
            yield {axes[0]: d, **rest}


def strategy_for(sizes: dict[str, int]) -> str:
    """The rule preset that spreads work over exactly the axes of ``sizes`` above 1."""
    names = [s for a, s in (("data", "dp"), ("fsdp", "fsdp"), ("tensor", "tp")) if sizes.get(a, 1) > 1]
    base = "_".join(names)
    if sizes.get("pipeline", 1) > 1:
        return f"pp_{base}" if base else "pp"
    return base or "dp"


def mesh_text(sizes: dict[str, int]) -> str:
    shown = [f"{a}={sizes[a]}" for a in AXIS_NAMES if sizes.get(a, 1) > 1]
    return ",".join(shown) or "data=1"


def flag_line(flags: dict[str, Any]) -> str:
    """Settings as the recipe's flags (``--mesh fsdp=8 --remat full ...``)."""
    out = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            out.append(f"{flag} {value}")
    return " ".join(out)


def mesh_flag(sizes: dict[str, int], strategy: str, preset: str | None) -> str:
    """``--mesh`` for ``sizes``: the preset's name when the preset laid out for ``strategy``
    (``mlsys_jax.parallel.resolve_mesh``) has exactly these sizes, so the recipe keeps its
    hardware (the fit check, the links); the sizes otherwise."""
    if preset is not None:
        from mlsys_jax.parallel import resolve_mesh

        try:
            _, laid_out, _ = resolve_mesh(preset, strategy, sizes.get("sequence", 1) > 1)
        except (PlanError, PresetError, ValueError):
            laid_out = {}
        if mesh_text(laid_out) == mesh_text(sizes):
            return preset
    return mesh_text(sizes)


def _settings(
    sizes: dict[str, int], model: str, batch: int, seq: int, fixed: dict[str, Any], preset: str | None = None
) -> Iterator[dict[str, Any]]:
    """Every recipe setting tried for one factorization."""
    p = sizes.get("pipeline", 1)
    rows = batch // (sizes.get("data", 1) * sizes.get("fsdp", 1))
    strategy = strategy_for(sizes)
    base = {
        "model": model,
        "mesh": mesh_flag(sizes, strategy, preset),
        "strategy": strategy,
        "batch": batch,
        "seq": seq,
    }
    if sizes.get("sequence", 1) > 1:
        base["sequence_parallel"] = True
    if p == 1:
        for m in MICROBATCHES:
            if rows % m == 0:
                for remat, _ in REMATS:
                    yield {**base, "microbatches": m, "schedule": "1f1b", "remat": remat, **fixed}
        return
    for m in sorted({k * p for k in STAGE_MICROBATCHES}):
        if rows % m:
            continue
        for schedule in SCHEDULES:
            virtual = 2 if schedule == "interleaved" else 1
            for remat, stash in PIPELINE_REMATS:
                yield {
                    **base,
                    "microbatches": m,
                    "schedule": schedule,
                    "virtual_stages": virtual,
                    "remat": remat,
                    "pipeline_stash": stash,
                    **fixed,
                }


def _quick_refusal(sizes: dict[str, int], model: Any, seq: int, batch: int) -> str | None:
    """Why the model cannot take ``sizes``, checked before building anything; None if it may."""
    cfg = model.config
    t = sizes.get("tensor", 1)
    heads = math.gcd(getattr(cfg, "n_heads", t), getattr(cfg, "n_kv_heads", t))
    if heads % t:
        return "tensor does not divide the key/value heads"
    if model.num_layers % sizes.get("pipeline", 1):
        return "pipeline does not divide the layers"
    if seq % sizes.get("sequence", 1):
        return "sequence does not divide the sequence length"
    if batch % (sizes.get("data", 1) * sizes.get("fsdp", 1)):
        return "the batch does not split over data x fsdp"
    return None


# ---- the analytic pass ----------------------------------------------------------------------


def refusals() -> tuple[type[Exception], ...]:
    """The errors that mark settings the toolkit cannot run (the CLI's user errors, and a
    tracing rule a kernel lacks): the candidate is refused, counted by the error's name."""
    from mlsys_jax.kernels.dispatch import KernelUnavailable
    from mlsys_jax.mesh import MeshError
    from mlsys_jax.models.base import ConfigError

    return (PlanError, ConfigError, MeshError, PresetError, KernelUnavailable, ValueError, NotImplementedError)


class _Cache:
    """Hardware per factorization and placements per plan, for the analytic pass."""

    def __init__(self, preset: MeshPreset) -> None:
        self.preset = preset
        self.placements: dict[Any, list[Any]] = {}
        self.hardware: dict[str, MeshPreset] = {}

    def placements_of(self, parts: PlanParts) -> list[Any]:
        key = (plan_key(parts.plan), specs_key(parts.model.specs))
        if key not in self.placements:
            self.placements[key] = parts.plan.placements(parts.model.specs)
        return self.placements[key]

    def hardware_of(self, sizes: dict[str, int]) -> MeshPreset:
        key = mesh_text(sizes)
        if key not in self.hardware:
            self.hardware[key] = hardware_for(self.preset, sizes)
        return self.hardware[key]


def state_bytes(parts: PlanParts) -> int:
    """Parameters, gradients and optimizer state per device (the memory model's)."""
    import mlsys_jax.analysis.memory as memory_model

    params = memory_model.param_bytes(parts.plan, parts.model.specs)
    return 2 * params + memory_model.optimizer_bytes(parts.plan, parts.model.specs, parts.optimizer)


def memory_against(cache: _Cache, cfg: RunConfig, parts: PlanParts) -> PlanMemory:
    """The memory model's figures for the run, against the hardware preset's HBM."""
    return dataclasses.replace(memory_of(cfg, parts), hbm=cache.preset.device.hbm_bytes)


def _time(rows: tuple[CollectiveRow, ...], hardware: MeshPreset, exposed: bool | None = None) -> float:
    return sum(
        r.count * row_time(r, link_for(hardware, r.axes)) for r in rows if exposed is None or is_exposed(r) == exposed
    )


def evaluate(cache: _Cache, cfg: RunConfig, parts: PlanParts, sizes: dict[str, int]) -> Candidate:
    """One candidate's memory and predicted step, from shapes alone."""
    memory = memory_against(cache, cfg, parts)
    hardware = cache.hardware_of(sizes)
    placements = cache.placements_of(parts)
    rows = collectives_of(cfg, parts=parts, placements=placements)
    analysis = analytic_analysis(cfg, parts, memory, rows)
    recomputes = analysis.recomputes
    prediction = predict(analysis, hardware)
    by_axis: dict[str, float] = {}
    for r in rows:
        key = "+".join(r.axes)
        by_axis[key] = by_axis.get(key, 0.0) + r.count * row_time(r, link_for(hardware, r.axes))
    return Candidate(
        flags=_flags(cfg),
        sizes=sizes,
        memory=memory,
        prediction=prediction,
        hidden_s=_time(rows, hardware, exposed=False),
        exposed_s=_time(rows, hardware, exposed=True),
        comm_by_axis=by_axis,
        recomputes=recomputes,
    )


#: The order a plan's flags are written in.
FLAG_ORDER = (
    "model",
    "mesh",
    "strategy",
    "sequence_parallel",
    "batch",
    "seq",
    "microbatches",
    "schedule",
    "virtual_stages",
    "pipeline_stash",
    "remat",
)


def _flags(cfg: RunConfig) -> dict[str, Any]:
    """The settings that differ from the recipe's defaults, plus the ones a plan always names."""
    from mlsys_jax.train.config import RunConfig

    always = ("model", "mesh", "strategy", "batch", "seq", "microbatches", "schedule", "remat")
    defaults, now = RunConfig().flat(), cfg.flat()
    chosen = {k for k, v in now.items() if k in always or v != defaults[k]}
    order = [k for k in FLAG_ORDER if k in chosen] + sorted(chosen - set(FLAG_ORDER))
    return {k: now[k] for k in order}


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Fastest step first. Steps within ``TIE`` of each other tie; among them a plan that keeps
    ``HEADROOM`` of HBM free goes first (the memory model's activations are good to about 15%),
    then the one with less communication (the one less exposed when overlap falls short)."""
    ordered = sorted(candidates, key=lambda c: (c.step_s, c.serial_s))
    out: list[Candidate] = []
    i = 0
    while i < len(ordered):
        j = i + 1
        while j < len(ordered) and ordered[j].step_s <= ordered[i].step_s * (1 + TIE):
            j += 1
        out.extend(sorted(ordered[i:j], key=lambda c: (_tight(c), c.serial_s, c.step_s)))
        i = j
    return out


def _tight(c: Candidate) -> bool:
    share = c.memory.share
    return share is not None and share > 1 - HEADROOM


# ---- confirmation ---------------------------------------------------------------------------


def confirm_candidate(c: Candidate, hardware: MeshPreset) -> Candidate:
    """``c`` with what compiling it says (see the module's docstring)."""
    from mlsys_jax.analysis.compiled_step import analyze
    from mlsys_jax.analysis.parts import plan_parts
    from mlsys_jax.train.config import RunConfig

    t0 = time.perf_counter()
    try:
        compiled = analyze(**c.flags)
    except (RuntimeError, *refusals()) as err:  # a plan that does not compile is dropped
        last = str(err).strip().splitlines()
        return dataclasses.replace(
            c, confirmed=Confirmation(time.perf_counter() - t0, error=last[-1] if last else repr(err))
        )
    seconds = time.perf_counter() - t0
    cfg = RunConfig.of(**c.flags)
    parts = plan_parts(cfg)
    read = collectives_of(cfg, "compiled", parts)
    rows = tuple(r for r in compiled.collectives if r.axes)

    def ratio(exposed: bool) -> float:
        ana, got = _time(read, hardware, exposed), _time(rows, hardware, exposed)
        return got / ana if ana > 0 else (1.0 if got == 0 else math.inf)

    hidden_ratio, exposed_ratio = ratio(False), ratio(True)
    # Communication the analytic model has none of (ratio inf): charged at the compiled figure.
    hidden = c.hidden_s * hidden_ratio if math.isfinite(hidden_ratio) else _time(rows, hardware, False)
    exposed = c.exposed_s * exposed_ratio if math.isfinite(exposed_ratio) else _time(rows, hardware, True)
    payload = lambda rs: sum(r.count * r.payload_bytes for r in rs)
    accessed = compiled.compiled.bytes_per_step if compiled.compiled is not None else 0.0
    return dataclasses.replace(
        c,
        hidden_s=hidden,
        exposed_s=exposed,
        confirmed=Confirmation(
            seconds=seconds,
            hidden_ratio=hidden_ratio,
            exposed_ratio=exposed_ratio,
            bytes_ratio=payload(rows) / max(payload(read), 1),
            analytic_step_s=c.step_s,
            bytes_accessed_s=accessed / hardware.device.hbm_bandwidth,
        ),
    )


def _confirm_all(best: list[Candidate], cache: _Cache, local_devices: int) -> list[Candidate]:
    """Compile each of ``best``; meshes larger than this process compile in subprocesses, two
    at a time."""

    def one(c: Candidate) -> Candidate:
        return confirm_candidate(c, cache.hardware_of(c.sizes))

    if any(math.prod(c.sizes.values()) <= local_devices for c in best) or len(best) < 2:
        return [one(c) for c in best]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, best))


# ---- the planner ----------------------------------------------------------------------------


def auto_plan(
    devices: int,
    hardware: str | MeshPreset,
    model: str,
    batch: int | None = None,
    seq: int = DEFAULT_SEQ,
    confirm: int = 3,
    progress: Callable[[str], None] | None = None,
    **fixed: Any,
) -> PlannerResult:
    """Enumerate, rank and confirm every plan of ``model`` on ``devices`` devices of the
    ``hardware`` preset (see the module's docstring). ``batch`` defaults to one sequence per
    device; ``fixed`` settings (``loss_impl="fused"``, ``attention_impl=...``) apply to every
    candidate. ``progress`` is told what each pass is doing."""
    import jax

    from mlsys_jax.analysis.parts import plan_parts
    from mlsys_jax.models import registry
    from mlsys_jax.train.config import RunConfig

    say = progress or (lambda _: None)
    if devices < 1:
        raise PlanError(f"--devices must be at least 1, got {devices}")
    preset = load_preset(hardware) if isinstance(hardware, str) else hardware
    shipped = hardware if isinstance(hardware, str) else None
    default_batch = batch is None
    batch = devices if batch is None else batch
    t0 = time.perf_counter()
    cache = _Cache(preset)
    built = registry.build_model(model)
    refused: dict[str, int] = {}
    enumerated = 0
    fitting: list[Candidate] = []
    unfit: list[Candidate] = []
    errors = refusals()

    outcomes: dict[str, dict[str, int]] = {}

    def note(sizes: dict[str, int], outcome: str, n: int = 1) -> None:
        counts = outcomes.setdefault(mesh_text(sizes), {})
        counts[outcome] = counts.get(outcome, 0) + n
        if outcome not in ("fits", "does not fit"):
            refused[outcome] = refused.get(outcome, 0) + n

    for sizes in factorizations(devices):
        settings = list(_settings(sizes, model, batch, seq, fixed, shipped))
        enumerated += len(settings)
        why = _quick_refusal(sizes, built, seq, batch)
        if why is not None:
            note(sizes, why, len(settings))
            continue
        try:
            cache.hardware_of(sizes)
        except PresetError:
            note(sizes, "the devices do not make whole slices", len(settings))
            continue
        state_checked = False
        for i, flags in enumerate(settings):
            try:
                cfg = RunConfig.of(**flags)
                parts = plan_parts(cfg)
                if not state_checked:
                    state_checked = True
                    if state_bytes(parts) > preset.device.hbm_bytes:
                        note(sizes, "the state alone does not fit", len(settings) - i)
                        break
                candidate = evaluate(cache, cfg, parts, sizes)
            except errors as err:
                note(sizes, type(err).__name__)
                continue
            note(sizes, "fits" if candidate.fits else "does not fit")
            (fitting if candidate.fits else unfit).append(candidate)
    analytic_s = time.perf_counter() - t0
    say(f"ranked {len(fitting)} plans that fit of {enumerated} in {analytic_s:.1f} s")
    ranked = rank(fitting)
    t1 = time.perf_counter()
    if confirm > 0 and ranked:
        say(f"compiling the best {min(confirm, len(ranked))} to confirm")
        confirmed = _confirm_all(ranked[:confirm], cache, len(jax.devices()))
        good = rank([c for c in confirmed if c.confirmed is not None and c.confirmed.ok])
        failed = [c for c in confirmed if c.confirmed is None or not c.confirmed.ok]
        for c in failed:  # counted as fitting when ranked; now refused
            outcomes[mesh_text(c.sizes)]["fits"] -= 1
            note(c.sizes, "did not compile")
        ranked = good + ranked[confirm:] + failed
    confirm_s = time.perf_counter() - t1
    ranked = [c for c in ranked if c.confirmed is None or c.confirmed.ok]
    # Kept of those that do not fit: the fastest, the leanest, and the nearest to fitting of
    # those faster than the winner (what memory cost it).
    unfit_kept = rank(unfit)[:UNFIT_KEPT]
    best = ranked[0].step_s if ranked else math.inf
    faster = [c for c in unfit if c.step_s < best]
    for extra in (
        min(unfit, key=lambda c: c.memory.total, default=None),
        min(faster, key=lambda c: c.memory.total, default=None),
    ):
        if extra is not None and extra not in unfit_kept:
            unfit_kept.append(extra)
    ranked = explain(ranked, unfit_kept, len(faster))
    return PlannerResult(
        model=model,
        devices=devices,
        hardware=preset.name,
        batch=batch,
        seq=seq,
        default_batch=default_batch,
        candidates=tuple(ranked),
        unfit=tuple(unfit_kept),
        enumerated=enumerated,
        refused=refused,
        outcomes=outcomes,
        analytic_s=analytic_s,
        confirm_s=confirm_s,
        fixed=dict(fixed),
    )


# ---- why --------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.2f} s"


def _comm_detail(c: Candidate) -> str:
    """The axes behind the communication computation does not hide: the exposed ones, and the
    hidden ones when they outlast the compute."""
    from mlsys_jax.analysis.analytic import EXPOSED_AXES

    def exposed(axes: str) -> bool:
        return any(a in EXPOSED_AXES for a in axes.split("+"))

    shown = [(t, a) for a, t in c.comm_by_axis.items() if t > 0 and (exposed(a) or c.hidden_s > c.compute_s)]
    top = sorted(shown, reverse=True)[:3]
    return ", ".join(f"{a} {_ms(t)}" for t, a in top) or "none"


def deciding(c: Candidate, winner: Candidate) -> tuple[str, float]:
    """The part (compute, communication, bubble) that costs ``c`` most against ``winner``."""
    mine, theirs = c.parts(), winner.parts()
    return max(((k, mine[k] - theirs[k]) for k in mine), key=lambda kv: kv[1])


def why_loses(c: Candidate, winner: Candidate) -> str:
    gap = c.step_s - winner.step_s
    factor, cost = deciding(c, winner)
    mine, theirs = c.parts(), winner.parts()
    memory = ""
    share, best_share = c.memory.share, winner.memory.share
    if share is not None and best_share is not None and share < best_share - 0.05:
        memory = f"; memory: needs {share:.0%} of HBM vs {best_share:.0%}"
    if gap <= winner.step_s * TIE and _tight(c) and not _tight(winner):
        return (
            f"ties #1 on step time, but memory: needs {share or 0:.0%} of HBM, less than the "
            f"{HEADROOM:.0%} headroom the memory model's accuracy asks for (#1: {best_share or 0:.0%})"
        )
    if gap <= winner.step_s * TIE:
        return (
            f"ties #1 on step time; more communication to hide ({_ms(c.hidden_s + c.exposed_s)} vs "
            f"{_ms(winner.hidden_s + winner.exposed_s)}){memory}"
        )
    text = f"loses {_ms(gap)} ({gap / winner.step_s:.0%}) on {factor}: {_ms(mine[factor])} vs {_ms(theirs[factor])}"
    if factor == "communication":
        text += f" ({_comm_detail(c)})"
    elif factor == "compute" and c.recomputes > winner.recomputes:
        text += f" ({c.recomputes} recomputed forward{'s' if c.recomputes > 1 else ''})"
    elif factor == "bubble":
        text += f" ({c.bubble:.0%} idle)"
    del cost
    return text + memory


def why_wins(
    winner: Candidate, runner_up: Candidate | None, unfit: tuple[Candidate, ...], faster_count: int = 0
) -> str:
    parts = winner.parts()
    bound = (
        "compute-bound"
        if parts["compute"] >= max(parts["communication"], parts["bubble"])
        else ("communication-bound" if parts["communication"] >= parts["bubble"] else "bubble-bound")
    )
    text = f"fastest that fits: {bound} ({_ms(parts['compute'])} compute, {_ms(parts['communication'])} unhidden communication"
    if winner.bubble > 0:
        text += f", {winner.bubble:.0%} bubble"
    text += ")"
    if runner_up is not None:
        factor, cost = deciding(runner_up, winner)
        if cost > 0:
            text += f"; beats #2 on {factor} by {_ms(cost)}"
        else:
            text += "; beats #2 on communication (less to hide)"
    faster = [u for u in unfit if u.step_s < winner.step_s]
    if faster:
        fastest, nearest = faster[0], min(faster, key=lambda u: u.memory.total)
        text += (
            f"; memory rules out {faster_count or len(faster)} faster plan{'s' if faster_count != 1 else ''} "
            f"(the fastest {_ms(fastest.step_s)}); the nearest to fitting, {nearest.label()}, would take "
            f"{_ms(nearest.step_s)} but needs {human_bytes(nearest.memory.total)} of "
            f"{human_bytes(nearest.memory.hbm or 0)}"
        )
    text += f"; memory {winner.memory.share or 0:.0%} of HBM"
    return text


def explain(ranked: list[Candidate], unfit: list[Candidate], faster_count: int = 0) -> list[Candidate]:
    """``ranked`` with a ``why`` on each of the top five (``faster_count``: how many plans that
    do not fit would be faster than the winner; ``unfit`` holds the fastest and the nearest)."""
    if not ranked:
        return ranked
    winner = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    out = [dataclasses.replace(winner, why=why_wins(winner, runner_up, tuple(unfit), faster_count))]
    out += [dataclasses.replace(c, why=why_loses(c, winner)) for c in ranked[1:TOP]]
    return out + ranked[TOP:]


# ---- views ------------------------------------------------------------------------------------


def planner_table(result: PlannerResult, n: int = TOP) -> Table:
    """The top ``n`` candidates with their memory and step by part (why each wins or loses is
    printed below it: ``Candidate.why``)."""
    from rich.table import Table

    table = Table(
        title=(
            f"auto plan: {result.model} on {result.devices} x {result.hardware}, batch {result.batch} x {result.seq} "
            f"({len(result.candidates)} of {result.enumerated} settings fit)"
        ),
        show_lines=True,
    )
    for name, justify in (
        ("#", "right"),
        ("plan", "left"),
        ("memory", "right"),
        ("compute", "right"),
        ("comm hidden+exposed", "right"),
        ("bubble", "right"),
        ("step", "right"),
        ("MFU", "right"),
        ("tok/s/chip", "right"),
        ("compiled", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name == "plan")  # type: ignore[arg-type]
    for i, c in enumerate(result.top(n), 1):
        conf = c.confirmed
        if conf is None:
            compiled = "-"
        else:
            compiled = f"ok {conf.seconds:.0f} s\ncomm x{conf.hidden_ratio:.2f}/x{conf.exposed_ratio:.2f}"
        table.add_row(
            str(i),
            c.label().replace(" ", "\n", 1),
            f"{human_bytes(c.memory.total)} ({c.memory.share or 0:.0%})",
            _ms(c.compute_s),
            f"{_ms(c.hidden_s)}\n+ {_ms(c.exposed_s)}",
            f"{c.bubble:.0%}",
            _ms(c.step_s),
            f"{c.mfu:.0%}",
            f"{c.tokens_per_s / c.prediction.devices:,.0f}",
            compiled,
        )
    return table


def print_result(result: PlannerResult, console: Console) -> None:
    """What ``mlsys-jax plan --auto`` prints: the batch, the table, the winner's flags."""
    console.print(result.describe_batch(), soft_wrap=True)
    console.print(planner_table(result))
    for i, c in enumerate(result.top(), 1):
        console.print(f"#{i} {c.why}", soft_wrap=True)
    refused = ", ".join(f"{k} {v}" for k, v in sorted(result.refused.items(), key=lambda kv: -kv[1]))
    console.print(
        f"{result.enumerated} settings in {result.analytic_s:.1f} s, {len(result.candidates)} fit; refused: "
        f"{refused or 'none'}; confirming took {result.confirm_s:.1f} s",
        soft_wrap=True,
    )
    console.print(f"winner: {result.winner_flags()}", soft_wrap=True)


__all__ = [
    "DEFAULT_SEQ",
    "Candidate",
    "Confirmation",
    "PlannerResult",
    "auto_plan",
    "factorizations",
    "hardware_for",
    "planner_table",
    "print_result",
    "rank",
    "strategy_for",
]
