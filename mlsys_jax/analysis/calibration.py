"""A cost model fitted to this host, and how far its predictions land from real steps.

``calibrate`` runs microbenchmarks on the devices of this process, every device at once (each
its own shard of a jitted ``shard_map``; warm-up calls, then the median of timed calls that
``block_until_ready``), and fits each by least squares on relative error:

- **matmul**: bf16 ``(m, m) @ (m, m)`` per device for a few ``m``: ``time = c + flops / rate``;
  the rate is the device's peak in the calibrated preset;
- **memory**: ``y = a x + b`` over float32 arrays far larger than the caches, in place (input
  donated): ``time = c + bytes / bandwidth`` (bytes read and written), the preset's HBM
  bandwidth; and the same into a fresh output, whose extra time is what first touching a fresh
  buffer costs per byte (page faults): XLA:CPU gets a step's temporary buffer fresh from the
  operating system on every execution, so a step pays it for its ``temp_bytes``;
- **collectives**: ``psum``, ``all_gather``, ``psum_scatter`` and ``ppermute`` over all devices at
  payloads from 1 KiB to 16 MiB, each once and a few times in a row in one program, priced as
  the analysis prices a compiled step's collectives: kind, group size, ring traffic and
  executions read from the compiled program (``collectives``), ``time = start + executions *
  (latency * ring_steps + traffic / bandwidth)`` (``cost.ring_steps``); one link for every axis.

and measures how the parts of a step combine here (``prediction.Execution``), each from a
program that runs two parts at once against the parts alone:

- **overlap**: a matmul beside an independent elementwise pass of about the same time;
- **comm_overlap**: the same matmul beside an independent all-reduce;
- **bubble_share**: the per-device matmul rate with half the devices busy against all of them
  (simulated devices sharing a few cores give an idle device's cores to the busy ones, so a
  pipeline's idle stages cost nothing; 1 means each device is on its own, as an accelerator);
- **dispatch_s**: an empty program on every device, what a step pays once to start;
- **loop_count_ratio**: the FLOPs XLA's cost analysis reports for a scan of matmuls over the
  real ones (a loop body is counted once, whatever its trip count): why compute comes from the
  model's FLOPs, not the compiled program's.

``Calibration.preset`` is a ``HostPreset`` that ``predict`` prices a plan on. ``validate``
analyzes plans the fit never saw, predicts their step on that preset, then builds each one's
real train step on the devices, times it and reports the error.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlsys_jax.analysis.collectives import collectives
from mlsys_jax.analysis.cost import ring_steps
from mlsys_jax.analysis.prediction import Execution, HostPreset, Prediction, predict
from mlsys_jax.meshes import AXIS_NAMES, Device, Link, MeshAxis

#: The one mesh axis of the microbenchmarks: every device of the process.
AXIS = "devices"
#: Bumped when the file's fields change meaning; a file of another format is refused.
FORMAT = 1
#: Matrix sizes of the matmul benchmark (bf16, square, per device).
MATMUL_SIZES = (128, 256, 512, 1024)
#: MiB per device of the elementwise pass: all of them together well beyond any cache.
MEMORY_MIB = (8, 16, 32, 64)
#: Collective payloads in bytes (``Collective.payload_bytes``: all-gather's result, the others'
#: operand), 1 KiB to 16 MiB.
MESSAGE_BYTES = (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
#: Collectives measured, by the JAX call that makes them.
COLLECTIVE_CALLS = ("psum", "all_gather", "psum_scatter", "ppermute")
RERUN = "Fix: rerun `mlsys-jax plan --calibrate` to measure this host again."


class CalibrationError(ValueError):
    """A calibration file that is missing or cannot be read back."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One microbenchmark measurement and what its fit gives for it.

    ``size``: the matrix size (matmul), bytes per device (memory), payload bytes (collectives);
    ``work``: the FLOPs, bytes moved or ring traffic bytes per device the fit is over, in all;
    ``steps``: a collective's ring steps in all; ``count``: how many times the program runs it;
    ``fitted``: the fit's seconds (NaN for points not fitted)."""

    bench: str
    kind: str
    size: int
    work: float
    seconds: float
    fitted: float = math.nan
    steps: int = 0
    count: int = 1

    @property
    def residual(self) -> float:
        """(fitted - measured) / measured."""
        return (self.fitted - self.seconds) / self.seconds


@dataclasses.dataclass(frozen=True)
class Calibration:
    """This host's fitted figures (per device, every device busy), how a step's parts combine
    here, and the raw points they were fitted on."""

    devices: int
    platform: str
    host: str
    jax_version: str
    created: str
    matmul_flops: float
    matmul_overhead_s: float
    memory_bandwidth: float
    memory_overhead_s: float
    fresh_bandwidth: float
    memory_bytes: int
    latency: float
    bandwidth: float
    collective_start_s: float
    dispatch_s: float
    overlap: float
    comm_overlap: float
    bubble_share: float
    loop_count_ratio: float
    points: tuple[Point, ...] = ()
    seconds: float = 0.0

    def __post_init__(self) -> None:
        positive = (
            "matmul_flops",
            "memory_bandwidth",
            "fresh_bandwidth",
            "latency",
            "bandwidth",
            "devices",
            "memory_bytes",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"calibration figure {name} must be positive and finite, got {value!r}")
        for name in ("overlap", "comm_overlap", "bubble_share"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"calibration share {name} must be within [0, 1], got {value!r}")

    # ---- what the cost model uses ------------------------------------------------------------

    @property
    def execution(self) -> Execution:
        return Execution(
            overlap=self.overlap,
            bubble_share=self.bubble_share,
            overhead_s=self.dispatch_s,
            fresh_bandwidth=self.fresh_bandwidth,
        )

    def preset(self) -> HostPreset:
        """This host as a mesh preset: the fitted rates as its device, one link (the fitted
        latency and bandwidth) for every mesh axis the toolkit knows, and how the step's parts
        combine here. ``predict(analysis, hardware=cal.preset())``."""
        link = Link("host", bandwidth=self.bandwidth, latency=self.latency)
        device = Device(
            kind=f"{self.platform} (calibrated: {self.host})",
            platform=self.platform,
            peak_bf16_flops=self.matmul_flops,
            hbm_bytes=self.memory_bytes,
            hbm_bandwidth=self.memory_bandwidth,
        )
        axes = tuple(MeshAxis(name, self.devices if name == "data" else 1, "host") for name in AXIS_NAMES)
        return HostPreset(
            name="calibrated",
            description=f"{self.devices} {self.platform} devices of this host, calibrated {self.created}",
            device=device,
            axes=axes,
            links={"host": link},
            strategy="dp",
            execution=self.execution,
        )

    def step_seconds(self, prediction: Prediction) -> float:
        """The predicted step here: from serial toward overlapped communication as far as the
        comm-overlap microbenchmark found collectives hidden behind compute."""
        return prediction.serial_s - self.comm_overlap * (prediction.serial_s - prediction.overlapped_s)

    def residuals(self) -> dict[str, float]:
        """Root-mean-square relative residual of each fit."""
        out: dict[str, list[float]] = {}
        for p in self.points:
            if math.isfinite(p.fitted):
                out.setdefault(p.bench, []).append(p.residual)
        return {k: math.sqrt(sum(r * r for r in v) / len(v)) for k, v in out.items()}

    # ---- files ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["points"] = [_finite_or_none(dataclasses.asdict(p)) for p in self.points]
        return {"format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this toolkit reads format {FORMAT}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(data) - {"points", "seconds"})
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        points = tuple(
            Point(**{**p, "fitted": math.nan if p.get("fitted") is None else p["fitted"]})
            for p in data.get("points", ())
        )
        return cls(**{k: v for k, v in data.items() if k in fields and k != "points"}, points=points)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON; a reader never sees a half-written file."""
        from mlsys_jax.analysis.files import write_whole

        return write_whole(path, json.dumps(self.to_json(), indent=2) + "\n")


def load(path: str | os.PathLike[str]) -> Calibration:
    """Read a calibration written by ``Calibration.save``; a missing or damaged file raises
    ``CalibrationError`` naming the file and the fix."""
    path = Path(path).expanduser()
    try:
        return Calibration.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CalibrationError(f"no calibration file at {path}. {RERUN}") from None
    except OSError as err:
        raise CalibrationError(f"calibration file {path} cannot be read ({err.strerror or err}). {RERUN}") from None
    except (ValueError, TypeError, KeyError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CalibrationError(f"calibration file {path} is damaged ({err}). {RERUN}") from None


def _finite_or_none(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: a point that was not fitted is written with ``fitted: null``."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ---- fits ---------------------------------------------------------------------------------------


def _relative_nnls(columns: Sequence[Sequence[float]], seconds: Sequence[float]) -> np.ndarray:
    """Non-negative coefficients x minimizing sum(((A x - t) / t)^2)."""
    from scipy.optimize import nnls

    t = np.asarray(seconds, float)
    a = np.asarray(columns, float).T / t[:, None]
    coef, _ = nnls(a, np.ones_like(t))
    return coef


def fit_rate(work: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """``seconds = overhead + work / rate`` by least squares on relative error; returns
    ``(rate, overhead)``. A fit that finds no cost per unit of work (noise) falls back to the
    best rate any point reached, with no overhead."""
    if len(work) != len(seconds) or not work:
        raise ValueError("fit_rate needs one time per work figure, and at least one")
    if len(work) > 1:
        overhead, per_unit = _relative_nnls([[1.0] * len(work), list(work)], seconds)
        if per_unit > 0:
            return 1.0 / float(per_unit), float(overhead)
    return max(w / s for w, s in zip(work, seconds)), 0.0


def fit_alpha_beta(
    steps: Sequence[int], traffic: Sequence[float], seconds: Sequence[float], *, intercept: bool = False
) -> tuple[float, float, float]:
    """``seconds = start + latency * steps + traffic / bandwidth`` by least squares on relative
    error, every coefficient non-negative (``start`` is 0 unless ``intercept``); returns
    ``(start, latency, bandwidth)``."""
    if not (len(steps) == len(traffic) == len(seconds)) or len(steps) < 2 + intercept:
        raise ValueError("fit_alpha_beta needs a few points, each with steps, traffic and seconds")
    columns = [list(map(float, steps)), list(traffic)]
    coef = _relative_nnls(([[1.0] * len(steps)] if intercept else []) + columns, seconds)
    start, latency, per_byte = coef if intercept else (0.0, *coef)
    if per_byte <= 0:  # no cost per byte measured: the fastest any point moved its traffic
        per_byte = min(s / b for s, b in zip(seconds, traffic) if b > 0)
    return float(start), float(latency), 1.0 / float(per_byte)


# ---- microbenchmarks --------------------------------------------------------------------------


def median_seconds(fn: Callable[..., Any], args: Sequence[Any], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn(*args)`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Bench:
    """Programs over every device of a mesh, one shard each, and their timings."""

    def __init__(self, devices: Sequence[Any], repeats: int) -> None:
        import jax
        from jax.sharding import Mesh

        self.jax = jax
        self.devices = list(devices)
        self.n = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.repeats = repeats

    def program(
        self,
        body: Callable[..., Any],
        n_in: int = 1,
        n_out: int = 1,
        mesh: Any = None,
        check_vma: bool = True,
        donate: bool = False,
    ) -> Any:
        from jax.sharding import PartitionSpec as P

        spec = P(AXIS)
        out_specs = spec if n_out == 1 else (spec,) * n_out
        mesh = mesh or self.mesh
        mapped = self.jax.shard_map(body, mesh=mesh, in_specs=(spec,) * n_in, out_specs=out_specs, check_vma=check_vma)
        return self.jax.jit(mapped, donate_argnums=tuple(range(n_in)) if donate else ())

    def array(self, per_device: tuple[int, ...], dtype: Any, mesh: Any = None) -> Any:
        """A sharded array of ``per_device`` on each device, made on the devices."""
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = mesh or self.mesh
        shape = (per_device[0] * mesh.devices.size, *per_device[1:])
        make = self.jax.jit(lambda: jnp.full(shape, 0.5, dtype), out_shardings=NamedSharding(mesh, P(AXIS)))
        return make()

    def time(self, fn: Any, *args: Any) -> float:
        return median_seconds(fn, args, self.repeats)

    def time_carried(self, fn: Any, *args: Any) -> float:
        """Median seconds of ``args = fn(*args)``, ``fn`` donating its inputs and giving back
        arrays of their shapes (copies of ``args`` are consumed, not ``args``)."""
        import jax.numpy as jnp

        args = tuple(jnp.copy(x) for x in args)
        times = []
        for _ in range(self.repeats + 2):
            t0 = time.perf_counter()
            out = self.jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
            args = out if isinstance(out, tuple) else (out,)
        return statistics.median(times[2:])


def _matmul_chain(links: int) -> Callable[[Any], Any]:
    def body(a: Any) -> Any:
        out = a
        for _ in range(links):
            out = out @ a
        return out

    return body


def _collective_once(call: str, n: int) -> Callable[[Any], Any]:
    """One collective that gives back an array of its input's shape (so it can run in a loop):
    all_gather's input is 1/n of its payload and keeps the first 1/n of the result;
    psum_scatter writes its 1/n result over the start of its input."""
    from jax import lax

    if call == "psum":
        return lambda x: lax.psum(x, AXIS)
    if call == "all_gather":
        return lambda x: lax.all_gather(x, AXIS, tiled=True)[: x.shape[0]]
    if call == "psum_scatter":
        return lambda x: lax.dynamic_update_slice(x, lax.psum_scatter(x, AXIS, tiled=True), (0,))
    if call == "ppermute":
        return lambda x: lax.ppermute(x, AXIS, [(i, (i + 1) % n) for i in range(n)])
    raise ValueError(f"unknown collective call {call!r}; the calls are {COLLECTIVE_CALLS}")


def _collective_loop(call: str, n: int, times: int) -> Callable[[Any], Any]:
    """``times`` of one collective in a row, each on the last one's result (as a step's
    collectives run between its computations, not each as a program of its own)."""
    from jax import lax

    once = _collective_once(call, n)
    return lambda x: lax.fori_loop(0, times, lambda i, y: once(y), x)


def _share(together: float, a: float, b: float) -> float:
    """How much of the shorter of two parts ran hidden behind the longer when run together:
    1 - (together - max) / min, within [0, 1]."""
    lo, hi = min(a, b), max(a, b)
    if lo <= 0:
        return 1.0
    return float(min(1.0, max(0.0, 1.0 - (together - hi) / lo)))


def calibrate(
    devices: Sequence[Any] | None = None,
    *,
    matmul_sizes: Sequence[int] = MATMUL_SIZES,
    memory_mib: Sequence[float] = MEMORY_MIB,
    message_bytes: Sequence[int] = MESSAGE_BYTES,
    repeats: int = 7,
    chain: int = 4,
    log: Callable[[str], None] | None = None,
) -> Calibration:
    """Fit this host's cost model on microbenchmarks over ``devices`` (all of this process's by
    default; at least 2, for the collectives). Takes seconds (about 20 with the defaults)."""
    import jax
    import jax.numpy as jnp

    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < 2:
        raise ValueError(
            f"calibrating needs at least 2 devices for its collectives, this process has {len(devices)}. Fix: "
            "simulate some, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts."
        )
    if len(matmul_sizes) < 2 or len(memory_mib) < 2 or len(message_bytes) < 1:
        raise ValueError("calibrate needs two matmul sizes, two memory sizes and one message size at least")
    say = log or (lambda _: None)
    started = time.perf_counter()
    bench = _Bench(devices, repeats)
    n = bench.n
    points: list[Point] = []

    # An empty program on every device: what each timed program pays to start.
    tiny = bench.array((1,), jnp.float32)
    dispatch = median_seconds(bench.program(lambda x: x + 1), (tiny,), 3 * repeats)
    points.append(Point("dispatch", "empty program", 4, 0.0, dispatch))
    say(f"dispatch {dispatch * 1e6:.0f} us")

    # Matmul rate, every device at once.
    mm = []
    for m in matmul_sizes:
        a = bench.array((m, m), jnp.bfloat16)
        t = bench.time_carried(bench.program(_matmul_chain(1), donate=True), a)
        mm.append(Point("matmul", "bf16", m, 2.0 * m**3, t))
    rate, mm_overhead = fit_rate([p.work for p in mm], [p.seconds for p in mm])
    points += [dataclasses.replace(p, fitted=mm_overhead + p.work / rate) for p in mm]
    say(f"matmul {rate / 1e9:.1f} GFLOP/s per device")

    # Memory: y = a x + b reads and writes every byte. In place (the input donated), it streams
    # through memory already mapped: the bandwidth. Into a fresh output, every page of the
    # output is first touched (a page fault) too: the rest of its time is what a fresh byte
    # costs, as a step's temporary buffer is fresh on every execution.
    mem, fresh = [], []
    for mib in memory_mib:
        elems = max(1, int(mib * (1 << 20)) // 4)
        x = bench.array((elems,), jnp.float32)
        fresh.append(
            Point("fresh memory", "f32 axpb, new output", elems * 4, elems * 4.0, bench.time(bench.program(_axpb), x))
        )
        mem.append(
            Point(
                "memory",
                "f32 axpb, in place",
                elems * 4,
                8.0 * elems,
                bench.time_carried(bench.program(_axpb, donate=True), x),
            )
        )
        del x
    bandwidth, mem_overhead = fit_rate([p.work for p in mem], [p.seconds for p in mem])
    points += [dataclasses.replace(p, fitted=mem_overhead + p.work / bandwidth) for p in mem]
    streamed = [2.0 * p.work / bandwidth for p in fresh]
    fresh_bw, fresh_overhead = fit_rate(
        [p.work for p in fresh], [max(p.seconds - s, 1e-9) for p, s in zip(fresh, streamed)]
    )
    points += [dataclasses.replace(p, fitted=s + fresh_overhead + p.work / fresh_bw) for p, s in zip(fresh, streamed)]
    say(f"memory {bandwidth / 1e9:.2f} GB/s per device in place; a fresh buffer's pages {fresh_bw / 1e9:.2f} GB/s")

    # Collectives: kind, group, ring traffic and executions as the analysis reads a compiled
    # step's. Each runs once and `chain` times in a row in one program; the fit's intercept is
    # what a program of collectives pays to start, the rest is per collective.
    coll = []
    for call in COLLECTIVE_CALLS:
        for size in message_bytes:
            elems = max(n, size // 4 // n * n)
            x = bench.array((elems // n if call == "all_gather" else elems,), jnp.float32)
            for times in (1, chain):
                fn = bench.program(_collective_loop(call, n, times), check_vma=False)
                found = collectives(fn.lower(x).compile().as_text())
                if len(found) != 1:
                    raise RuntimeError(f"{call} compiled to {len(found)} collectives, expected one: {found}")
                c = found[0]
                coll.append(
                    Point(
                        "collective",
                        c.kind,
                        c.payload_bytes,
                        c.count * c.traffic_bytes,
                        bench.time(fn, x),
                        steps=c.count * ring_steps(c.kind, c.group_size),
                        count=c.count,
                    )
                )
            del x
    start, latency, link_bw = fit_alpha_beta(
        [p.steps for p in coll], [p.work for p in coll], [p.seconds for p in coll], intercept=True
    )
    points += [dataclasses.replace(p, fitted=start + latency * p.steps + p.work / link_bw) for p in coll]
    say(f"collectives {latency * 1e6:.1f} us per ring step, {link_bw / 1e9:.2f} GB/s, {start * 1e6:.0f} us to start")

    # How parts combine: one program running a matmul of the largest size beside an independent
    # elementwise pass of about the same time, another beside an all-reduce of the largest
    # message, against each part alone. Every program works in place (its inputs donated, its
    # results fed back), so no fresh buffer is in the way; each pays the empty program's time
    # once, taken off.
    m = max(matmul_sizes)
    a = bench.array((m, m), jnp.bfloat16)
    matmul = _matmul_chain(1)
    t_mm = bench.time_carried(bench.program(matmul, donate=True), a) - dispatch
    elems = max(1, min(int(bandwidth * max(t_mm, 1e-4) / 8), int(max(memory_mib) * (1 << 20)) // 4))
    x = bench.array((elems,), jnp.float32)
    t_ew = bench.time_carried(bench.program(_axpb, donate=True), x) - dispatch
    both = bench.program(lambda a, x: (matmul(a), _axpb(x)), n_in=2, n_out=2, donate=True)
    t_both = bench.time_carried(both, a, x) - dispatch
    overlap = _share(t_both, t_mm, t_ew)
    points += [
        Point("overlap", "matmul", m, 2.0 * m**3, t_mm),
        Point("overlap", "elementwise pass", elems * 4, 8.0 * elems, t_ew),
        Point("overlap", "both in one program", m, 0.0, t_both),
    ]
    del x
    say(f"compute/memory overlap {overlap:.2f}")
    elems = max(n, max(message_bytes) // 4 // n * n)
    y = bench.array((elems,), jnp.float32)
    psum = _collective_once("psum", n)
    t_ar = bench.time_carried(bench.program(psum, donate=True, check_vma=False), y) - dispatch
    with_ar = bench.program(lambda a, y: (matmul(a), psum(y)), n_in=2, n_out=2, donate=True, check_vma=False)
    t_mm_ar = bench.time_carried(with_ar, a, y) - dispatch
    comm_overlap = _share(t_mm_ar, t_mm, t_ar)
    points += [
        Point("comm_overlap", "all-reduce", elems * 4, 0.0, t_ar),
        Point("comm_overlap", "matmul and all-reduce in one program", m, 0.0, t_mm_ar),
    ]
    del y
    say(f"compute/communication overlap {comm_overlap:.2f}")

    # Do idle devices free the host for busy ones? The matmul on half the devices.
    half = max(1, n // 2)
    from jax.sharding import Mesh

    sub = Mesh(np.array(devices[:half]), (AXIS,))
    a_half = bench.array((m, m), jnp.bfloat16, mesh=sub)
    t_half = bench.time_carried(bench.program(matmul, mesh=sub, donate=True), a_half)
    t_all = t_mm + dispatch
    speedup = t_all / t_half  # per-device rate with half the devices busy over all of them
    bubble_share = float(min(1.0, max(0.0, 2.0 - speedup)))
    points += [
        Point("sharing", f"matmul on {n} devices", m, 2.0 * m**3, t_all),
        Point("sharing", f"matmul on {half} devices", m, 2.0 * m**3, t_half),
    ]
    say(f"half the devices busy: {speedup:.2f}x the per-device rate; bubble share {bubble_share:.2f}")

    loop_ratio = _loop_count_ratio()
    say(f"cost analysis of a 4-step scan counts {loop_ratio:.2f} of its FLOPs")

    return Calibration(
        devices=n,
        platform=devices[0].platform,
        host=f"{platform.machine()} {os.cpu_count()} cores",
        jax_version=jax.__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        matmul_flops=rate,
        matmul_overhead_s=mm_overhead,
        memory_bandwidth=bandwidth,
        memory_overhead_s=mem_overhead,
        fresh_bandwidth=fresh_bw,
        memory_bytes=_host_memory() // n,
        latency=latency if latency > 0 else 1e-9,
        bandwidth=link_bw,
        collective_start_s=start,
        dispatch_s=dispatch,
        overlap=overlap,
        comm_overlap=comm_overlap,
        bubble_share=bubble_share,
        loop_count_ratio=loop_ratio,
        points=tuple(points),
        seconds=time.perf_counter() - started,
    )


def _axpb(x: Any) -> Any:
    return x * 1.5 + 0.5


def _loop_count_ratio(trips: int = 4, m: int = 128) -> float:
    """XLA's cost-analysis FLOPs of a ``trips``-step scan of (m, m) matmuls over the real ones."""
    import jax
    import jax.numpy as jnp

    def scanned(x: Any, ws: Any) -> Any:
        out, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, ws)
        return out

    x = jax.ShapeDtypeStruct((m, m), jnp.float32)
    ws = jax.ShapeDtypeStruct((trips, m, m), jnp.float32)
    cost = jax.jit(scanned).lower(x, ws).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0)) / (trips * 2.0 * m**3)


def _host_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 34


# ---- validation against real steps --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ValidationRow:
    """One plan: the calibrated prediction of its step, by part, and the measured step."""

    plan: Mapping[str, Any]
    predicted_s: float
    measured_s: float
    compute_s: float
    memory_s: float
    fresh_s: float
    comm_s: float
    bubble: float
    step_times: tuple[float, ...]

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def label(self) -> str:
        return plan_label(self.plan)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "plan": dict(self.plan), "label": self.label, "error": self.error}


def plan_label(plan: Mapping[str, Any]) -> str:
    """A plan in a few words: strategy, mesh, batch x sequence, and the pipeline's settings."""
    parts = [
        str(plan.get("strategy") or ""),
        str(plan.get("mesh", "")),
        f"b{plan.get('batch', 16)}x{plan.get('seq', 128)}",
    ]
    if plan.get("schedule") or plan.get("microbatches", 1) != 1:
        parts.append(f"{plan.get('schedule', '')} m{plan.get('microbatches', 1)}".strip())
    return " ".join(p for p in parts if p)


def measure_step(plan: Mapping[str, Any], steps: int = 5, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` real train steps of ``plan`` (recipe settings, as ``analyze``
    takes them) on this process's devices, after ``warmup`` steps: the step ``analyze`` compiles,
    on a fresh state and one batch of random tokens."""
    import jax

    from mlsys_jax.analysis.parts import plan_parts, train_step_of
    from mlsys_jax.parallel import resolve_mesh
    from mlsys_jax.train.config import RunConfig
    from mlsys_jax.train.state import init_state

    cfg = RunConfig.of(**plan)
    _, sizes, _ = resolve_mesh(cfg.mesh.mesh, cfg.mesh.strategy, cfg.mesh.sequence_parallel)
    wanted = math.prod(sizes.values())
    if wanted > len(jax.devices()):
        raise ValueError(f"plan {plan_label(plan)} needs {wanted} devices; this process has {len(jax.devices())}")
    parts = plan_parts(cfg, concrete=True)
    step = train_step_of(cfg, parts)
    model, the_plan, optimizer, d = parts.model, parts.plan, parts.optimizer, cfg.data
    state = init_state(the_plan, model.specs, optimizer, d.seed)
    tokens = np.random.default_rng(d.seed).integers(0, model.vocab_size, (d.batch, d.seq + 1)).astype(np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((d.batch, d.seq), bool)}
    batch = {k: jax.device_put(v, step.batch_shardings[k]) for k, v in host.items()}
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def validate(
    calibration: Calibration,
    plans: Iterable[Mapping[str, Any]],
    *,
    steps: int = 5,
    warmup: int = 2,
    log: Callable[[ValidationRow], None] | None = None,
) -> list[ValidationRow]:
    """For each plan: analyze it, predict its step on the calibrated preset, then build its real
    train step on this process's devices and take the median of ``steps`` timed steps."""
    from mlsys_jax.analysis.compiled_step import analyze

    preset = calibration.preset()
    rows = []
    for plan in plans:
        analysis = analyze(**plan)
        p = predict(analysis, preset)
        times = measure_step(plan, steps, warmup)
        row = ValidationRow(
            plan=dict(plan),
            predicted_s=calibration.step_seconds(p),
            measured_s=statistics.median(times),
            compute_s=p.compute_s,
            memory_s=p.memory_s,
            fresh_s=p.fresh_s,
            comm_s=p.comm_s,
            bubble=p.bubble,
            step_times=tuple(times),
        )
        if log is not None:
            log(row)
        rows.append(row)
    return rows


def error_summary(rows: Sequence[ValidationRow]) -> dict[str, float]:
    """Median and worst absolute relative error over the rows."""
    errors = [abs(r.error) for r in rows]
    return {"median_abs_error": statistics.median(errors), "worst_abs_error": max(errors)}


# ---- views --------------------------------------------------------------------------------------


def calibration_table(cal: Calibration) -> Any:
    """The fitted figures as a rich table: what each is, its value, the fit's residual."""
    from rich.table import Table

    res = cal.residuals()
    rms = lambda bench: f"{res[bench]:.0%}" if bench in res else "-"
    table = Table(title=f"calibration of {cal.devices} {cal.platform} devices ({cal.host}, jax {cal.jax_version})")
    for col in ("figure", "value", "from", "fit rms error"):
        table.add_column(col, justify="left" if col in ("figure", "from") else "right")
    table.add_row(
        "matmul rate per device",
        f"{cal.matmul_flops / 1e9:.1f} GFLOP/s",
        "bf16 m x m matmuls, all devices",
        rms("matmul"),
    )
    table.add_row(
        "memory bandwidth per device",
        f"{cal.memory_bandwidth / 1e9:.2f} GB/s",
        "y = a x + b, large arrays",
        rms("memory"),
    )
    table.add_row(
        "a fresh buffer's first touch",
        f"{cal.fresh_bandwidth / 1e9:.2f} GB/s",
        "the same into a new output",
        rms("fresh memory"),
    )
    table.add_row(
        "collective latency",
        f"{cal.latency * 1e6:.1f} us / ring step",
        "psum, all_gather, psum_scatter, ppermute",
        rms("collective"),
    )
    table.add_row(
        "collective bandwidth",
        f"{cal.bandwidth / 1e9:.2f} GB/s per device",
        "ring traffic, 1 KiB to 16 MiB",
        rms("collective"),
    )
    table.add_row("step launch", f"{cal.dispatch_s * 1e6:.0f} us", "an empty program on every device", "-")
    table.add_row("compute/memory overlap", f"{cal.overlap:.2f}", "a matmul beside an elementwise pass", "-")
    table.add_row("compute/communication overlap", f"{cal.comm_overlap:.2f}", "a matmul beside an all-reduce", "-")
    table.add_row("bubble share paid", f"{cal.bubble_share:.2f}", "matmul rate, half the devices busy", "-")
    table.add_row("loop FLOPs counted by XLA", f"{cal.loop_count_ratio:.2f}", "cost analysis of a 4-step scan", "-")
    return table


def validation_table(rows: Sequence[ValidationRow]) -> Any:
    """Predicted against measured step per plan, with the prediction's parts."""
    from rich.table import Table

    table = Table(title="calibrated prediction against measured steps")
    columns = (
        "plan",
        "predicted ms",
        "measured ms",
        "error",
        "compute ms",
        "memory ms",
        "fresh ms",
        "comm ms",
        "bubble",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in rows:
        style = "green" if abs(r.error) <= 0.2 else "red"
        table.add_row(
            r.label,
            f"{r.predicted_s * 1e3:.1f}",
            f"{r.measured_s * 1e3:.1f}",
            f"[{style}]{r.error:+.0%}[/]",
            f"{r.compute_s * 1e3:.1f}",
            f"{r.memory_s * 1e3:.1f}",
            f"{r.fresh_s * 1e3:.1f}",
            f"{r.comm_s * 1e3:.1f}",
            f"{r.bubble:.2f}",
        )
    return table
