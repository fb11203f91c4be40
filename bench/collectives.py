"""All-reduce algorithms built from point-to-point sends, measured against their alpha-beta costs.

Two settings of 8 CPU devices, float32, each message size per device (``--setting`` picks one):

- ``1x8``: one process of 8 simulated devices (threads of one process on this host's cores);
- ``2x4``: two processes of 4, joined into one job by ``jax.distributed`` on localhost with gloo
  as the CPU collectives (the bench starts both processes itself).

Measured in each: the ring all-reduce (one bucket), recursive halving-doubling, the hierarchical
all-reduce on a 2 x 4 mesh (inner axis: 4 devices; in ``2x4`` those of one process, the outer
axis across the 2 processes), one parameter-server step with sharded owners and an SGD update
(``p - lr * g``), a single-server parameter server (device 0 holds every parameter: the workers
push their whole gradient to it one by one, it updates and sends the result back one by one; a
pattern of this bench, ``single_server_step``, built from ppermute like the others) and
``lax.psum`` (XLA's own all-reduce), each inside ``jax.shard_map``.

Timing: each program runs its all-reduce ``k`` times in a ``lax.fori_loop``, each on the last
one's result (``k`` is an argument: one compilation serves every ``k``). After a warm-up, the
median of ``--repeats`` calls (``block_until_ready``) is taken at ``k = 1`` and at ``k = K``, ``K``
chosen from ``t(1)`` so the long call runs for tens of milliseconds; one all-reduce costs ``(t(K)
- t(1)) / (K - 1)``, which drops what a call pays once (dispatch, the start of a program). The
gradients of the parameter-server steps are the loop's carry: with loop-invariant gradients XLA
hoists the whole push phase out of the loop and only the pulls would be timed. The bench reads
the collective ops inside each compiled loop and records them beside the model's step count.
In ``2x4`` process 0's timings are reported (every call synchronises both processes).

Permute fit: a separate microbenchmark on the same devices, never the algorithms' own timings,
fits each link's cost per step: a chain of ``y = ppermute(y) + y`` steps (a send whose result is
used before the next, as in every algorithm) at a few message sizes, timed the same way, and
``seconds = alpha + beta * bytes`` fitted by least squares on relative error. ``1x8`` has one
link (a shift along the 8-device ring); ``2x4`` has three kinds of step: ``inner`` (a shift
within each process), ``outer`` (a shift by 4: every message crosses processes) and ``mixed``
(a shift along the 8-device ring: some messages of each kind, which gloo here runs far slower
than either).

Predictions (``mlsys_jax.comm.models``), per algorithm and size:

- ``calibration``: ``time_s(cost(...), alpha, beta)`` with the plan view's figures from
  ``bench/results/calibration-cpu.json``: alpha its ``latency`` (per ring step of XLA's fused
  collectives), beta ``1 / bandwidth``; psum as XLA's ring (2(n-1) steps, 2(n-1)/n * V bytes);
- ``fitted``: the point-to-point algorithms with ``time_on(cost(..., node_size), inner, outer,
  mixed)`` (the single server priced on worker 0, as measured), every step charged to the fitted link it crosses (in ``2x4``: ``inner`` when all its messages
  stay within processes, ``outer`` when all cross, ``mixed`` when it has both, as every step of
  the 8-device ring does); psum keeps the calibration's prediction.

Ring vs parameter server: measured times side by side, bytes per worker (ring 2(n-1)/n * V;
sharded owners (n-1)/n * V out and (n-1)/n * V back; a single server V out and V back per worker
and n * V in and n * V out through a dedicated server, (n-1) * V each way for the one measured
here on worker 0) and where the fitted model puts the ring against each server pattern.

Writes bench/results/collectives-cpu.json and a PNG. Run from the repository root:
``python bench/collectives.py`` (about 1.5 minutes for ``1x8`` and 3 to 5 for ``2x4``, whose gloo
steps are slower; ``--quick`` for two small sizes in under a minute, ``--setting 1x8`` or ``2x4``
for one setting, ``--sizes`` to choose).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_DEVICES = 8
WORKER_FLAG = "--worker"
# Imported by a test, jax is set up with its own devices; a worker asks for its own share.
if "jax" not in sys.modules and WORKER_FLAG not in sys.argv:
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        + [f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from rich.console import Console
from rich.table import Table

from mlsys_jax.analysis.calibration import median_seconds
from mlsys_jax.comm import models
from mlsys_jax.comm.models import AlphaBeta

CALIBRATION = ROOT / "bench" / "results" / "calibration-cpu.json"


def shown_path(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it, as the results record it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


INNER, OUTER = 4, 2
LR = 0.01
ALGOS = ("ring", "halving_doubling", "hierarchical", "parameter_server", "parameter_server_single", "psum")
PERMUTE_ALGOS = ALGOS[:-1]
PRESETS = {
    "default": [4**k * 1024 for k in range(1, 8)],  # 4 KiB .. 16 MiB
    "quick": [4 * 1024, 64 * 1024],
    "small": [4**k * 1024 for k in range(1, 5)],
}
#: Message sizes of the permute microbenchmark (bytes per message): the algorithms send V/8 to V/2.
MICRO_SIZES = {"default": [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22], "quick": [1 << 10, 1 << 18]}
#: Timed calls per median, by setting and --quick: gloo's calls vary more than one process's.
REPEATS = {"1x8": {False: 7, True: 3}, "2x4": {False: 9, True: 5}}
TARGET = 0.25
WHY = (
    "The simulated devices are threads sharing 2 host cores and one memory: a 'send' is a memory "
    "copy plus a rendezvous of every device thread, so each collective-permute pays a fixed "
    "synchronisation cost (about 0.1 ms in one process) far above the per-step latency fitted on "
    "XLA's fused all-reduce (about 11 us). The calibration's alpha prices that fused op, not a chain "
    "of permutes; the fitted permute link prices each step as the microbenchmark measured it. What the "
    "fit leaves out: the algorithms' own work between sends (padding, slicing, sums, writing rows of "
    "the gathered result) runs on the same 2 cores as the copies, so large messages can come out "
    "slower than the fit. Across processes (gloo over TCP loopback) a step's cost depends on its pattern more "
    "than on its bytes: a permute with messages both inside and between processes (every step of "
    "the 8-device ring) has cost about 10x one with either kind alone, hence a fitted 'mixed' step, "
    "and steps that alternate between patterns (halving-doubling, hierarchical) have cost several "
    "times what the same pattern repeated costs in the microbenchmark; "
    "a permute with a single pair (the single server's) has at times cost far less than one that "
    "moves every device's data, which the model prices alike; independent permutes (the parameter server's "
    "pushes) sometimes overlap; and timings vary several-fold from run to run with the load on the "
    "2 cores."
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """Processes x devices per process of one job; nodes are processes."""

    name: str
    processes: int
    per_process: int

    @property
    def n(self) -> int:
        return self.processes * self.per_process

    @property
    def node_size(self) -> int | None:
        return self.per_process if self.processes > 1 else None

    @property
    def links(self) -> tuple[str, ...]:
        return ("inner", "outer", "mixed") if self.processes > 1 else ("inner",)

    def describe(self) -> str:
        if self.processes == 1:
            return f"1 process x {self.per_process} simulated CPU devices"
        return f"{self.processes} processes x {self.per_process} CPU devices over gloo"


SETTINGS = {"1x8": Setting("1x8", 1, NUM_DEVICES), "2x4": Setting("2x4", 2, NUM_DEVICES // 2)}


# ---- pure helpers --------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """A preset name or a comma list of byte counts (each a positive multiple of 4)."""
    if text in PRESETS:
        return list(PRESETS[text])
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 or s % 4 for s in sizes):
        raise ValueError(f"sizes must be positive multiples of 4 bytes or one of {list(PRESETS)}: {text!r}")
    return sizes


def model_cost(algorithm: str, n: int, nbytes: float, node_size: int | None = None) -> models.Cost:
    """The alpha-beta cost of ``algorithm`` as this bench runs it: ``psum`` as XLA's ring, the
    hierarchical one with an inner axis of ``INNER``, the single server on device 0."""
    if algorithm == "psum":
        return models.cost("ring", n, nbytes, node_size=node_size)
    if algorithm == "hierarchical":
        return models.cost(algorithm, n, nbytes, inner=INNER, outer=n // INNER, node_size=node_size)
    return models.cost(algorithm, n, nbytes, node_size=node_size, dedicated_server=False)


def predict(algorithm: str, n: int, nbytes: float, alpha: float, bandwidth: float) -> float:
    """Predicted seconds for one all-reduce: ``alpha`` per step, ``1 / bandwidth`` per byte."""
    return models.time_s(model_cost(algorithm, n, nbytes), alpha, 1.0 / bandwidth)


def predict_fit(
    algorithm: str, setting: Setting, nbytes: float, links: dict[str, AlphaBeta], cal: dict[str, float]
) -> float:
    """The fitted prediction: each step on the fitted link it crosses; ``psum`` on the calibration."""
    if algorithm == "psum":
        return predict(algorithm, setting.n, nbytes, cal["latency"], cal["bandwidth"])
    c = model_cost(algorithm, setting.n, nbytes, setting.node_size)
    return models.time_on(c, links["inner"], links.get("outer"), links.get("mixed"))


def collective_ops(algorithm: str, n: int) -> int:
    """Collective ops one all-reduce runs: one collective-permute per step of the point-to-point
    algorithms, a single all-reduce op for ``psum``."""
    return 1 if algorithm == "psum" else model_cost(algorithm, n, 0).steps


def error(measured: float, predicted: float) -> float:
    """Signed relative error of the prediction: (predicted - measured) / measured."""
    return (predicted - measured) / measured


def median_abs(errors: Sequence[float]) -> float:
    return statistics.median(abs(e) for e in errors) if errors else math.nan


def summarize(points: Sequence[dict[str, Any]], key: str = "error") -> dict[str, float]:
    """Median absolute ``key`` error per algorithm, and ``overall`` over every point."""
    out = {a: median_abs([p[key] for p in points if p["algorithm"] == a]) for a in ALGOS}
    out = {a: e for a, e in out.items() if not math.isnan(e)}
    out["overall"] = median_abs([p[key] for p in points])
    return out


def bytes_per_worker(n: int, nbytes: float) -> dict[str, float]:
    """What each pattern moves for an all-reduce of ``nbytes`` per worker over ``n`` workers."""
    share = (n - 1) / n * nbytes
    return {
        "ring_sent": 2 * share,
        "ps_out": share,
        "ps_back": share,
        "single_out": float(nbytes),
        "single_back": float(nbytes),
        "server_in": n * float(nbytes),
        "server_out": n * float(nbytes),
    }


def ring_vs_servers(points: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Per size: measured time of each parameter-server pattern over the ring's (above 1: the
    ring is faster), and the bytes each moves per worker."""
    by = {(p["algorithm"], p["bytes"]): p for p in points}
    rows = []
    for size in sorted({p["bytes"] for p in points}):
        ring = by.get(("ring", size))
        if ring is None:
            continue
        row: dict[str, Any] = {"bytes": size, "ring_s": ring["measured_s"], **bytes_per_worker(n, size)}
        for name, key in (("parameter_server", "ps"), ("parameter_server_single", "single")):
            other = by.get((name, size))
            if other is not None:
                row[f"{key}_s"] = other["measured_s"]
                row[f"{key}_over_ring"] = other["measured_s"] / ring["measured_s"]
        rows.append(row)
    return rows


def model_crossovers(setting: Setting, links: dict[str, AlphaBeta], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Where the fitted model puts ring against each server pattern, and its time ratio per size."""
    out = []
    inner, outer, mixed = links["inner"], links.get("outer"), links.get("mixed")
    for other, dedicated in (
        ("parameter_server", True),
        ("parameter_server_single", False),
        ("parameter_server_single", True),
    ):
        kw = {"node_size": setting.node_size, "dedicated_server": dedicated}
        x = models.crossover("ring", other, setting.n, inner, outer, mixed, **kw)
        ratios = {}
        for size in sizes:
            ring = models.time_on(models.cost("ring", setting.n, size, **kw), inner, outer, mixed)
            ratios[size] = models.time_on(models.cost(other, setting.n, size, **kw), inner, outer, mixed) / ring
        name = (
            other if other == "parameter_server" else f"{other} ({'dedicated server' if dedicated else 'on worker 0'})"
        )
        out.append(
            {
                "pattern": name,
                "crossover_bytes": x.nbytes,
                "faster_below": x.below,
                "faster_above": x.above,
                "model_over_ring": {str(k): v for k, v in ratios.items()},
            }
        )
    return out


def chain_length(per_call: float, target_s: float, cap: int) -> int:
    """K for the long program: about ``target_s`` of calls as long as ``per_call``, 3 to ``cap``."""
    return max(3, min(cap, round(target_s / max(per_call, 1e-9))))


def load_calibration(path: Path) -> dict[str, float]:
    """The collective figures of a calibration: a bench result (under its "calibration" key) or a
    file written by ``Calibration.save``."""
    from mlsys_jax.analysis.calibration import Calibration

    data = json.loads(path.read_text())
    cal = Calibration.from_json(data.get("calibration", data))
    return {
        "latency": cal.latency,
        "bandwidth": cal.bandwidth,
        "collective_start_s": cal.collective_start_s,
        "dispatch_s": cal.dispatch_s,
    }


def loop_ops(hlo: Any) -> int:
    """Collective ops inside the compiled program's loop (the ones each iteration runs)."""
    from mlsys_jax.analysis.collectives import collectives

    return sum(1 for c in collectives(hlo) if c.trip_counts)


# ---- programs ------------------------------------------------------------------------------


def single_server_step(grads: Any, params: Any, lr: float, axis_name: str) -> Any:
    """One synchronous step with every parameter on device 0: each other device sends it its
    whole gradient (n-1 permutes, one sender each), device 0 sums them and applies SGD, then sends
    the new parameters to each device in turn (n-1 permutes). Equal to ``params - lr * psum(grads)``
    everywhere."""
    import jax.numpy as jnp
    from jax import lax

    n = lax.axis_size(axis_name)
    i = lax.axis_index(axis_name)
    total = grads
    for w in range(1, n):
        total = total + lax.ppermute(grads, axis_name, [(w, 0)])  # zeros on every other device
    new = params - lr * total  # meaningful on device 0 only
    for w in range(1, n):
        new = jnp.where(i == w, lax.ppermute(new, axis_name, [(0, w)]), new)
    return new


def ordered_devices() -> list[Any]:
    """Every device of the job, process by process (each process's devices consecutive)."""
    import jax

    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def build(algorithm: str) -> tuple[Callable[..., Any], Any, Any]:
    """A jitted ``(x, k) -> x`` running ``algorithm`` k times in a row, its mesh and spec."""
    import jax
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from mlsys_jax import comm

    devices = ordered_devices()
    if algorithm == "hierarchical":
        mesh = Mesh(np.array(devices).reshape(OUTER, INNER), ("outer", "inner"))
        spec = P(("outer", "inner"))
    else:
        mesh = Mesh(np.array(devices), ("data",))
        spec = P("data")

    def once(y: jax.Array, x: jax.Array) -> jax.Array:
        if algorithm == "ring":
            return comm.ring_all_reduce(y, "data", buckets=1)
        if algorithm == "halving_doubling":
            return comm.halving_doubling_all_reduce(y, "data")
        if algorithm == "hierarchical":
            return comm.hierarchical_all_reduce(y, "inner", "outer")
        if algorithm == "parameter_server":  # y (the carry): the gradients; x: the parameters
            return comm.parameter_server_step(y, x, lambda p, g: p - LR * g, "data")
        if algorithm == "parameter_server_single":
            return single_server_step(y, x, LR, "data")
        return lax.psum(y, "data")

    def body(x: jax.Array, k: jax.Array) -> jax.Array:
        return lax.fori_loop(0, k, lambda _, y: once(y, x), x)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)
    return jax.jit(mapped), mesh, spec


def micro_pairs(setting: Setting, link: str) -> list[tuple[int, int]]:
    """The permute of the microbenchmark: ``inner`` a shift by one within each process (the whole
    ring in one process), ``outer`` a shift by one process, ``mixed`` a shift along every device."""
    n, per = setting.n, setting.per_process
    if link == "outer":
        return [(i, (i + per) % n) for i in range(n)]
    if link == "mixed":
        return [(i, (i + 1) % n) for i in range(n)]
    return [(i, (i // per) * per + (i + 1) % per) for i in range(n)]


def build_chain(pairs: Sequence[tuple[int, int]]) -> tuple[Callable[..., Any], Any, Any]:
    """A jitted ``(x, k) -> x`` of k steps ``y = ppermute(y, pairs) + y``."""
    import jax
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(ordered_devices()), ("data",))
    spec = P("data")

    def body(x: jax.Array, k: jax.Array) -> jax.Array:
        return lax.fori_loop(0, k, lambda _, y: lax.ppermute(y, "data", list(pairs)) + y, x)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, P()), out_specs=spec, check_vma=False)
    return jax.jit(mapped), mesh, spec


# ---- measuring -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long programs are timed: medians of ``repeats`` calls, the long call about ``target_s``
    but at most ``cap`` iterations."""

    repeats: int
    target_s: float
    cap: int


def zeros(mesh: Any, spec: Any, per_device: int) -> Any:
    """A float32 array of zeros, ``per_device`` bytes on each device (every process its own)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    elems = per_device // 4
    n = mesh.devices.size
    return jax.make_array_from_callback(
        (elems * n,), NamedSharding(mesh, spec), lambda _: np.zeros((elems,), np.float32)
    )


def agreed(k: int) -> int:
    """Process 0's ``k`` in every process of the job: each must run the same programs."""
    import jax

    if jax.process_count() == 1:
        return k
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(k)))


def per_iteration(fn: Callable[..., Any], x: Any, timing: Timing) -> dict[str, Any]:
    """Seconds per loop iteration of ``fn(x, k)``: (t(K) - t(1)) / (K - 1)."""
    import jax.numpy as jnp

    t1 = median_seconds(fn, (x, jnp.int32(1)), timing.repeats)
    k = agreed(chain_length(t1, timing.target_s, timing.cap))
    tk = median_seconds(fn, (x, jnp.int32(k)), timing.repeats)
    seconds = (tk - t1) / (k - 1)
    if seconds <= 0:  # noise swamped the difference: fall back to the amortized mean
        seconds = tk / k
    return {"seconds": seconds, "t_1_s": t1, "t_k_s": tk, "k": k}


def measure_links(setting: Setting, sizes: Sequence[int], timing: Timing, say: Callable[[str], None]) -> list[dict]:
    """The permute microbenchmark: seconds per chain step, per link and message size."""
    import jax.numpy as jnp

    out = []
    for link in setting.links:
        fn, mesh, spec = build_chain(micro_pairs(setting, link))
        for size in sizes:
            x = zeros(mesh, spec, size)
            compiled = fn.lower(x, jnp.int32(1)).compile()
            r = per_iteration(compiled, x, timing)
            out.append({"link": link, "bytes": size, **r})
            say(f"[{setting.name}] permute {link:5s} {human(size):>8s} {r['seconds'] * 1e3:9.3f} ms/step")
            del x
    return out


def measure_algorithms(
    setting: Setting, sizes: Sequence[int], timing: Timing, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Seconds per all-reduce of every algorithm at every size, and the ops in each loop."""
    import jax.numpy as jnp

    points = []
    for algorithm in ALGOS:
        fn, mesh, spec = build(algorithm)
        ops = None
        for size in sizes:
            x = zeros(mesh, spec, size)
            compiled = fn.lower(x, jnp.int32(1)).compile()
            if ops is None:
                ops = loop_ops(compiled)
            r = per_iteration(compiled, x, timing)
            points.append(
                {
                    "setting": setting.name,
                    "algorithm": algorithm,
                    "bytes": size,
                    "measured_s": r["seconds"],
                    "t_1_s": r["t_1_s"],
                    "t_k_s": r["t_k_s"],
                    "k": r["k"],
                    "ops_in_loop": ops,
                }
            )
            say(f"[{setting.name}] {algorithm:23s} {human(size):>8s} {r['seconds'] * 1e3:9.3f} ms")
            del x
    return points


def measure_here(
    setting: Setting, sizes: Sequence[int], micro: Sequence[int], timing: Timing, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both measurements on this process's job."""
    return {
        "micro": measure_links(setting, micro, timing, say),
        "points": measure_algorithms(setting, sizes, timing, say),
    }


# ---- the 2-process job ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONUNBUFFERED"] = "1"
    return out


def worker(args: argparse.Namespace) -> None:
    """One process of the ``2x4`` job: join it, measure, and (process 0) write the raw results."""
    from mlsys_jax import distributed
    from mlsys_jax.mesh import simulate_cpu_devices

    setting = SETTINGS[args.worker]
    simulate_cpu_devices(setting.per_process, check=False)
    distributed.join(None, f"localhost:{args.port}", setting.processes, args.process)
    import jax

    if jax.device_count() != setting.n or jax.local_device_count() != setting.per_process:
        raise SystemExit(f"expected {setting.n} devices, {setting.per_process} local; got {jax.devices()}")
    primary = args.process == 0
    say = (lambda s: print(s, flush=True)) if primary else (lambda s: None)
    timing = Timing(args.repeats, args.target, args.cap)
    raw = measure_here(setting, parse_sizes(args.sizes), [int(s) for s in args.micro.split(",")], timing, say)
    if primary:
        Path(args.job_out).write_text(json.dumps(raw) + "\n")


def run_job(
    setting: Setting, sizes: Sequence[int], micro: Sequence[int], timing: Timing, say: Callable[[str], None]
) -> dict[str, Any]:
    """Start the processes of ``setting`` at once and return process 0's raw results."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "job.json"
        procs, logs = [], []
        for i in range(setting.processes):
            cmd = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, setting.name]
            cmd += ["--port", str(port), "--process", str(i), "--job-out", str(out)]
            cmd += ["--sizes", ",".join(map(str, sizes)), "--micro", ",".join(map(str, micro))]
            cmd += ["--repeats", str(timing.repeats), "--target", str(timing.target_s), "--cap", str(timing.cap)]
            log = open(Path(tmp) / f"process-{i}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 1200
        failed = None
        while any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        for line in texts[0].splitlines():
            if line.startswith("[") and not line.startswith("[Gloo]"):
                say(line)
        bad = [i for i, p in enumerate(procs) if p.returncode != 0]
        if bad or not out.exists():
            i = bad[0] if bad else 0
            raise RuntimeError(f"{setting.name} process {i} exited {procs[i].returncode}:\n{texts[i][-3000:]}")
        return json.loads(out.read_text())


# ---- analysis ------------------------------------------------------------------------------


def fit_links(micro: Sequence[dict[str, Any]]) -> dict[str, AlphaBeta]:
    """Alpha and beta of each link from the microbenchmark's steps."""
    out = {}
    for link in dict.fromkeys(m["link"] for m in micro):
        mine = [m for m in micro if m["link"] == link]
        out[link] = models.fit_alpha_beta([m["bytes"] for m in mine], [m["seconds"] for m in mine])
    return out


def analyze(setting: Setting, raw: dict[str, Any], cal: dict[str, float], seconds: float) -> dict[str, Any]:
    """Predictions, errors, the ring against the servers and the model's crossovers of one setting."""
    links = fit_links(raw["micro"])
    for m in raw["micro"]:
        m["fitted_s"] = links[m["link"]].seconds(1, m["bytes"])
    points = []
    for p in raw["points"]:
        a, size = p["algorithm"], p["bytes"]
        c = model_cost(a, setting.n, size, setting.node_size)
        calib = predict(a, setting.n, size, cal["latency"], cal["bandwidth"])
        fit = predict_fit(a, setting, size, links, cal)
        points.append(
            {
                **p,
                "predicted_s": calib,
                "error": error(p["measured_s"], calib),
                "predicted_fit_s": fit,
                "error_fit": error(p["measured_s"], fit),
                "model_ops": collective_ops(a, setting.n),
                "steps": c.steps,
                "bytes_per_device": c.bytes_per_device,
                "phases": [dataclasses.asdict(ph) for ph in c.phases],
            }
        )
    fit_summary = summarize(points, "error_fit")
    return {
        "processes": setting.processes,
        "devices_per_process": setting.per_process,
        "node_size": setting.node_size,
        "links": {
            name: {
                "alpha_s": ab.alpha,
                "beta_s_per_byte": ab.beta,
                "bandwidth_bytes_per_s": 1 / ab.beta if ab.beta > 0 else math.inf,
                "points": [m for m in raw["micro"] if m["link"] == name],
            }
            for name, ab in links.items()
        },
        "points": points,
        "median_abs_error_fit": fit_summary,
        "median_abs_error_calibration": summarize(points, "error"),
        "within_target": fit_summary["overall"] <= TARGET,
        "ops_match_model": all(p["ops_in_loop"] == p["model_ops"] for p in points),
        "ring_vs_parameter_server": ring_vs_servers(points, setting.n),
        "model_crossovers": model_crossovers(setting, links, sorted({p["bytes"] for p in points})),
        "seconds": seconds,
    }


def verdicts(setting: Setting, run: dict[str, Any]) -> list[str]:
    """Where the ring beats each server pattern, measured and modelled, in words."""
    lines = []
    rows = run["ring_vs_parameter_server"]
    for key, name in (("ps", "the sharded parameter server"), ("single", "the single server (on worker 0)")):
        have = [r for r in rows if f"{key}_over_ring" in r]
        wins = [f"{human(r['bytes'])} ({r[f'{key}_over_ring']:.2f}x)" for r in have if r[f"{key}_over_ring"] > 1]
        losses = [f"{human(r['bytes'])} ({r[f'{key}_over_ring']:.2f}x)" for r in have if r[f"{key}_over_ring"] <= 1]
        lines.append(
            f"[{setting.name}] measured: ring beats {name} at "
            + (", ".join(wins) if wins else "no size")
            + ("; not at " + ", ".join(losses) if losses else "")
        )
    for x in run["model_crossovers"]:
        lo, hi = min(x["model_over_ring"].values()), max(x["model_over_ring"].values())
        span = f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}x to {hi:.2f}x"
        span += " the ring's time at the sizes measured"
        if x["crossover_bytes"] is None:
            who = (
                "equal to the ring at every size"
                if x["faster_above"] == "tie"
                else f"{x['faster_above']} faster at every size"
            )
            lines.append(f"[{setting.name}] model: {x['pattern']}: {who} ({span})")
        else:
            lines.append(
                f"[{setting.name}] model: {x['pattern']}: {x['faster_below']} faster below "
                f"{human(x['crossover_bytes'])}, {x['faster_above']} above ({span})"
            )
    return lines


# ---- reporting -----------------------------------------------------------------------------


def human(nbytes: float) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.3g} B"


def tables(setting: Setting, run: dict[str, Any]) -> list[Table]:
    micro = Table(title=f"[{setting.name}] permute microbenchmark: y = ppermute(y) + y, per step")
    for col in ("link", "message", "measured (ms)", "fitted (ms)", "fit error"):
        micro.add_column(col, justify="left" if col == "link" else "right")
    for name, link in run["links"].items():
        for m in link["points"]:
            micro.add_row(
                name,
                human(m["bytes"]),
                f"{m['seconds'] * 1e3:.3f}",
                f"{m['fitted_s'] * 1e3:.3f}",
                f"{error(m['seconds'], m['fitted_s']) * 100:+.0f}%",
            )
        micro.add_row(
            f"[b]{name} fit[/b]",
            "",
            f"alpha {link['alpha_s'] * 1e6:.1f} us",
            f"{link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s",
            "",
        )
    main = Table(title=f"[{setting.name}] all-reduce on {setting.describe()}, float32 (per device message)")
    cols = ("algorithm", "size", "measured (ms)", "calibration (ms)", "error", "fitted (ms)", "error ", "ops/model")
    for col in cols:
        main.add_column(col, justify="left" if col == "algorithm" else "right")
    for p in run["points"]:
        main.add_row(
            p["algorithm"],
            human(p["bytes"]),
            f"{p['measured_s'] * 1e3:.3f}",
            f"{p['predicted_s'] * 1e3:.3f}",
            f"{p['error'] * 100:+.0f}%",
            f"{p['predicted_fit_s'] * 1e3:.3f}",
            f"{p['error_fit'] * 100:+.0f}%",
            f"{p['ops_in_loop']}/{p['model_ops']}",
        )
    errs = Table(title=f"[{setting.name}] median |error| over sizes (target {TARGET:.0%}; psum: calibration in both)")
    errs.add_column("algorithm")
    errs.add_column("calibration alpha-beta", justify="right")
    errs.add_column("fitted permute alpha-beta", justify="right")
    for name, e in run["median_abs_error_calibration"].items():
        errs.add_row(name, f"{e * 100:.0f}%", f"{run['median_abs_error_fit'][name] * 100:.0f}%")
    ring = Table(
        title=f"[{setting.name}] ring vs parameter server (measured; > 1x: the ring is faster), bytes per worker"
    )
    cols = ("size", "ring (ms)", "PS / ring", "single / ring", "ring sent", "PS out + back", "single out + back")
    for col in (*cols, "server in + out"):
        ring.add_column(col, justify="right")
    for r in run["ring_vs_parameter_server"]:
        ring.add_row(
            human(r["bytes"]),
            f"{r['ring_s'] * 1e3:.3f}",
            f"{r['ps_over_ring']:.2f}x" if "ps_over_ring" in r else "-",
            f"{r['single_over_ring']:.2f}x" if "single_over_ring" in r else "-",
            human(r["ring_sent"]),
            f"{human(r['ps_out'])} + {human(r['ps_back'])}",
            f"{human(r['single_out'])} + {human(r['single_back'])}",
            f"{human(r['server_in'])} + {human(r['server_out'])}",
        )
    return [micro, main, errs, ring]


def picture(runs: dict[str, dict[str, Any]], cal: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(7.5 * len(runs), 5.5), squeeze=False)
    colors = {a: f"C{i}" for i, a in enumerate(ALGOS)}
    for ax, (name, run) in zip(axes[0], runs.items()):
        setting = SETTINGS[name]
        links = {k: AlphaBeta(v["alpha_s"], v["beta_s_per_byte"]) for k, v in run["links"].items()}
        sizes = sorted({p["bytes"] for p in run["points"]})
        grid = np.geomspace(min(sizes), max(sizes), 50) if len(sizes) > 1 else np.array(sizes, float)
        for algorithm in ALGOS:
            mine = [p for p in run["points"] if p["algorithm"] == algorithm]
            if not mine:
                continue
            color = colors[algorithm]
            ax.plot(
                [p["bytes"] for p in mine], [p["measured_s"] * 1e3 for p in mine], "o", color=color, label=algorithm
            )
            model = [predict_fit(algorithm, setting, s, links, cal) * 1e3 for s in grid]
            ax.plot(grid, model, "-", color=color, alpha=0.7, linewidth=1.2)
        calib = [predict("ring", setting.n, s, cal["latency"], cal["bandwidth"]) * 1e3 for s in grid]
        ax.plot(grid, calib, ":", color="grey", label="ring/psum, calibration alpha-beta")
        ax.plot([], [], "-", color="grey", label="lines: fitted permute model")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [human(s) for s in sizes], rotation=30)
        ax.set_xlabel("message size per device (bytes, float32)")
        ax.set_ylabel("time per all-reduce (ms)")
        fits = "\n".join(
            f"{k}: {v['alpha_s'] * 1e6:.0f} us + {v['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s"
            for k, v in run["links"].items()
        )
        ax.set_title(f"{setting.describe()}; fitted permute step:\n{fits}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("All-reduce built from ppermute: measured (points) vs alpha-beta model (lines)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default=None, help=f"bytes per device, comma list, or a preset {list(PRESETS)}")
    p.add_argument("--quick", action="store_true", help="two small sizes, two permute sizes, few repeats")
    p.add_argument("--setting", choices=[*SETTINGS, "both"], default="both", help="1x8, 2x4 or both (default)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "collectives-cpu.json")
    p.add_argument("--calibration", type=Path, default=CALIBRATION)
    p.add_argument("--repeats", type=int, default=None)
    # one process of the 2x4 job (started by the bench itself)
    p.add_argument(WORKER_FLAG, choices=list(SETTINGS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--process", type=int, help=argparse.SUPPRESS)
    p.add_argument("--job-out", help=argparse.SUPPRESS)
    p.add_argument("--micro", help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.worker:
        worker(args)
        return {}

    import jax

    names = list(SETTINGS) if args.setting == "both" else [args.setting]
    if "1x8" in names and len(jax.devices()) < NUM_DEVICES:
        raise SystemExit(f"needs {NUM_DEVICES} devices, found {len(jax.devices())}")
    sizes = parse_sizes(args.sizes or ("quick" if args.quick else "default"))
    micro = MICRO_SIZES["quick" if args.quick else "default"]
    chain = (0.005, 8) if args.quick else (0.05, 64)
    timings = {name: Timing(args.repeats or REPEATS[name][args.quick], *chain) for name in names}
    cal = load_calibration(args.calibration)
    console = Console(width=140)
    say = lambda s: console.print(s, highlight=False, markup=False)
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        setting = SETTINGS[name]
        t0 = time.perf_counter()
        if setting.processes == 1:
            raw = measure_here(setting, sizes, micro, timings[name], say)
        else:
            raw = run_job(setting, sizes, micro, timings[name], say)
        runs[name] = analyze(setting, raw, cal, time.perf_counter() - t0)
    for name, r in runs.items():
        for table in tables(SETTINGS[name], r):
            console.print(table)
        for line in verdicts(SETTINGS[name], r):
            say(line)
        if not r["ops_match_model"]:
            say(f"[{name}] WARNING: collective ops per loop iteration differ from the model's steps (ops/model column)")
    points = [p for r in runs.values() for p in r["points"]]
    fit, calib = summarize(points, "error_fit"), summarize(points, "error")
    for name, r in runs.items():
        e = r["median_abs_error_fit"]["overall"]
        say(
            f"[{name}] median |error|: fitted permute model {e:.0%}, calibration only "
            f"{r['median_abs_error_calibration']['overall']:.0%} (target {TARGET:.0%}); measured in {r['seconds']:.0f} s"
        )
    say(f"overall median |error|: fitted permute model {fit['overall']:.0%}, calibration only {calib['overall']:.0%}")
    result = {
        "benchmark": "collectives",
        "device": jax.devices()[0].device_kind,
        "devices": NUM_DEVICES,
        "host_cores": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "settings": {
            "dtype": "float32",
            "sizes_bytes": sizes,
            "permute_sizes_bytes": micro,
            "repeats": {n: t.repeats for n, t in timings.items()},
            "warmup": 2,
            "chain_target_s": chain[0],
            "chain_cap": chain[1],
            "runs": {n: SETTINGS[n].describe() for n in names},
            "hierarchical": f"inner {INNER} x outer {OUTER} (2x4: inner = one process's devices)",
            "parameter_server_update": f"sgd p - {LR} * g; gradients are the loop carry",
            "single_server": "device 0 holds every parameter (a worker too): n-1 pushes of V, n-1 pulls of V",
            "method": "(t(K) - t(1)) / (K - 1), medians of calls; start and dispatch costs cancel",
            "permute_fit": "chain of y = ppermute(y) + y per link; seconds = alpha + beta * bytes, "
            "least squares on relative error",
            "prediction": "calibration: comm.models.time_s with alpha = latency, beta = 1 / bandwidth; "
            "fitted: comm.models.time_on with the fitted links, psum on the calibration",
        },
        "calibration_file": shown_path(args.calibration),
        "calibration": cal,
        "runs": runs,
        "points": points,
        "median_abs_error_fit": fit,
        "median_abs_error_calibration": calib,
        "target_abs_error": TARGET,
        "within_target": fit["overall"] <= TARGET,
        "why": WHY,
        "seconds": sum(r["seconds"] for r in runs.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    picture(runs, cal, png)
    say(f"wrote {shown_path(args.out)} and {shown_path(png)}")
    return result


if __name__ == "__main__":
    run()
