"""The published table of serving gains, reproduced on our own engine, in-process.

One row per technique, each measured by driving ``mlsys_jax.serve.Engine`` directly (no HTTP,
so the figures are the engine's), set beside the range commonly quoted for it:

=========================  =====================  =======================
technique                  latency reduction      throughput increase
=========================  =====================  =======================
static graph compilation   15-30%                 20-40%
FP16 quantization          20-50%                 30-100%
kernel fusion              10-25%                 15-35%
dynamic batching (b=8)     adds latency           +200-400% (vs batch 1)
continuous batching        (none quoted)          +500-1000% or more
=========================  =====================  =======================

- static graph compilation: a small fixed burst through the engine's jitted programs against
  the same engine stepped under ``jax.disable_jit()`` (every jnp op dispatched on its own). Both
  use ``paged_attention="xla"``: the default path wraps attention in ``shard_map``, which op by
  op recompiles every op on every call (seconds per step), which is not what op by op means.
- quantization: the same burst of 64 requests served in fp32, in bf16 compute, with int8 weights
  and with an int8 KV cache; then each variant's decode program alone, with its compiled HLO's
  converts and dot types, and the fp32 and int8 KV decode steps at two KV pool sizes (does a
  step's time follow the pool's size?).
- kernel fusion: the Pallas paged-attention kernel against gather-then-attend in XLA (GPU only;
  on CPU Pallas runs only interpreted, so not measured); and, measured everywhere, XLA's own
  fusion: the engine's decode step compiled in subprocesses (on CPU) with and without
  ``--xla_disable_hlo_passes=fusion``, trusted only if the compiled HLO then has fewer multi-op
  fusions and more kernels.
- batching: a Poisson request stream (exponential gaps, seeded) with exponentially distributed
  output lengths, replayed by wall clock at several rates against no batching (one sequence),
  static batches of 16, dynamic batches (8, or whatever waited 50 ms) and continuous batching
  (16 slots). Throughput is generated tokens over the time from the first arrival to the last
  finish; "offered" is the tokens asked for over the arrivals' span, and a row is marked
  saturated when it served less than 90% of that.

Latency figures are p50 request latency (arrival to last token). Every request generates
exactly its drawn number of tokens (greedy; the end-of-sequence token does not end it), and
every program is compiled before anything is timed. A figure off its published range comes
with a "why" built from this run's own measurements. Prints the technique table and one row
per (scheduler, rate); writes bench/results/serving.json and bench/results/serving-cpu.png
(throughput against p99 request latency, one line per scheduler). About 5 minutes on 2 CPU cores.

    python bench/serving.py [--ckpt-dir runs/train_lm] [--requests 128] [--rates 4,16,128]
    python bench/serving.py --quick --random-model tiny --out /tmp/serving   # a minute, no checkpoint
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

import mlsys_jax  # noqa: F401  (mounts kernels/ as mlsys_jax.kernels from a source tree)
from mlsys_jax.serve.config import ServeConfig
from mlsys_jax.serve.engine import Engine, EngineConfig
from mlsys_jax.serve.kv_blocks import TRASH
from mlsys_jax.serve.requests import SamplingParams

RESULTS = ROOT / "bench" / "results"
DEFAULT_CKPT = "runs/train_lm"
MEAN_OUTPUT = 32
MAX_OUTPUT = 96
PROMPT_TOKENS = (8, 24)
BATCH_TIMEOUT_S = 0.05
NUM_BLOCKS = 512  # KV-cache blocks of 16 tokens (ServeConfig's default)
FUSION_FLAG = "--xla_disable_hlo_passes=fusion"

#: Published ranges in percent: (low, high), None for an open end; None for no published figure.
Range = tuple[float | None, float | None]
PUBLISHED: dict[str, dict[str, Any]] = {
    "static graph compilation": {"latency": (15.0, 30.0), "throughput": (20.0, 40.0), "text": ("15-30%", "20-40%")},
    "FP16 quantization": {"latency": (20.0, 50.0), "throughput": (30.0, 100.0), "text": ("20-50%", "30-100%")},
    "kernel fusion": {"latency": (10.0, 25.0), "throughput": (15.0, 35.0), "text": ("10-25%", "15-35%")},
    "dynamic batching": {"latency": (None, 0.0), "throughput": (200.0, 400.0), "text": ("adds latency", "200-400%")},
    "continuous batching": {"latency": None, "throughput": (500.0, None), "text": ("-", "500-1000% or more")},
}


# ---- pure pieces: verdicts, changes, the workload, percentiles ---------------------------------------
def verdict(value: float | None, published: Range | None) -> str:
    """Where a measured figure falls against a published (low, high) range (None: open end):
    "within", "above" or "below"; "not measured" without a figure, "no published figure"
    without a range. Both ends are inclusive."""
    if published is None:
        return "no published figure"
    if value is None or not math.isfinite(value):
        return "not measured"
    low, high = published
    if low is not None and value < low:
        return "below"
    if high is not None and value > high:
        return "above"
    return "within"


def latency_reduction_pct(baseline: float, variant: float) -> float:
    """How much lower ``variant``'s latency is than ``baseline``'s, in percent (negative: higher)."""
    return (1.0 - variant / baseline) * 100.0


def throughput_increase_pct(baseline: float, variant: float) -> float:
    """How much higher ``variant``'s throughput is than ``baseline``'s, in percent."""
    return (variant / baseline - 1.0) * 100.0


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a workload: when it arrives (seconds from the start), its prompt, its length."""

    request_id: str
    arrival_s: float
    prompt: tuple[int, ...]
    max_tokens: int


def workload(
    n: int,
    rate: float,
    *,
    seed: int,
    corpus: Sequence[int],
    mean_output: float = MEAN_OUTPUT,
    max_output: int = MAX_OUTPUT,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    prefix: str = "r",
) -> list[Request]:
    """``n`` requests arriving as a Poisson process of ``rate`` per second (exponential gaps; the
    first at 0; ``rate=inf``: all at 0), each a slice of ``corpus`` of uniformly drawn length in
    ``prompt_tokens`` (inclusive) asking for max(1, round(Exp(mean_output))) tokens, capped at
    ``max_output``. The same arguments give the same requests."""
    if n < 1 or not rate > 0:
        raise ValueError(f"need at least one request and a positive rate, got n={n}, rate={rate}")
    lo, hi = prompt_tokens
    if len(corpus) <= hi:
        raise ValueError(f"the corpus has {len(corpus)} tokens; prompts need more than {hi}")
    rng = np.random.default_rng(seed)  # drawn in this order, so times and lengths do not depend on the corpus
    gaps = rng.exponential(1.0, n) / rate
    arrivals = np.cumsum(gaps) - gaps[0]
    outputs = np.clip(np.round(rng.exponential(mean_output, n)), 1, max_output).astype(int)
    lengths = rng.integers(lo, hi + 1, n)
    starts = rng.integers(0, len(corpus) - hi, n)
    return [
        Request(
            f"{prefix}{i}",
            float(arrivals[i]),
            tuple(int(t) for t in corpus[starts[i] : starts[i] + lengths[i]]),
            int(outputs[i]),
        )
        for i in range(n)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation), NaN for no values."""
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


@dataclasses.dataclass
class Record:
    """What happened to one request (seconds from the start of its replay)."""

    arrival_s: float
    max_tokens: int
    first_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0
    reason: str | None = None


def summarize(records: Sequence[Record], wall_s: float) -> dict[str, float]:
    """Throughput (generated tokens / wall seconds), p50/p99 of time to first token (from the
    request's arrival), of time per output token after the first (requests of 2+ tokens), and of
    request latency (arrival to last token), over finished requests."""
    done = [r for r in records if r.finish_s is not None and r.first_s is not None]
    ttft = [r.first_s - r.arrival_s for r in done if r.first_s is not None]
    tpot = [(r.finish_s - r.first_s) / (r.tokens - 1) for r in done if r.tokens > 1 and r.finish_s and r.first_s]
    latency = [r.finish_s - r.arrival_s for r in done if r.finish_s is not None]
    tokens = sum(r.tokens for r in done)
    return {
        "requests": len(records),
        "finished": len(done),
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
    }


def fusion_stats(hlo: str) -> dict[str, int]:
    """Counts in a compiled module's HLO text: ``fusions`` (fusion instructions), ``multi_op_fusions``
    (those whose fused computation holds 2+ operations besides parameters and constants),
    ``fused_ops`` (the operations inside those) and ``kernels`` (operations outside any fused
    computation or reducer: what runs as a separate kernel, fusions included)."""
    bodies: dict[str, list[str]] = {}
    name: str | None = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head:
            name = str(head.group(1))
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            op = _opcode(line)
            if op is not None:
                bodies[name].append(op)
    fused = set(re.findall(r"\bfusion\(.*?calls=%([\w.\-]+)", hlo))
    reducers = set(re.findall(r"to_apply=%([\w.\-]+)", hlo))
    trivial = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
    sizes = [sum(op not in {"parameter", "constant"} for op in bodies.get(c, [])) for c in fused]
    multi = [s for s in sizes if s >= 2]
    kernels = sum(op not in trivial for c, ops in bodies.items() if c not in fused and c not in reducers for op in ops)
    return {
        "fusions": sum(1 for c in re.findall(r"\bfusion\(", hlo)),
        "multi_op_fusions": len(multi),
        "fused_ops": sum(multi),
        "kernels": kernels,
    }


def _opcode(line: str) -> str | None:
    """The opcode of one HLO instruction line, None for anything else."""
    m = re.match(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*)$", line)
    if not m:
        return None
    rest = m.group(1)
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    op = re.match(r"\s*([a-z][\w\-]*)\(", rest)
    return op.group(1) if op else None


def hlo_ops(hlo: str) -> dict[str, int]:
    """How many of each opcode a compiled module's HLO text holds (fused computations included),
    and the element types of its dots (``dot:f32``)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in hlo.splitlines():
        op = _opcode(line)
        if op is None:
            continue
        counts[op] += 1
        if op == "dot":
            kind = re.search(r"=\s*([a-z0-9]+)\[", line)
            counts[f"dot:{kind.group(1) if kind else '?'}"] += 1
    return dict(counts)


# ---- engines ---------------------------------------------------------------------------------------
#: Builds an engine: factory(scheduler=, max_seqs=, dtype=, weights=, kv_cache=, batch_timeout_s=).
EngineFactory = Callable[..., Engine]


class NotMeasured(RuntimeError):
    """A figure this machine or this engine cannot produce; the message says why."""


def has_checkpoint(ckpt_dir: str | Path) -> bool:
    folder = Path(ckpt_dir).expanduser()
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def checkpoint_factory(ckpt_dir: str, *, block_size: int = 16, prefill_chunk: int = 64):
    """Engines of a training run's newest checkpoint, through ``engine_for`` as ``mlsys-jax serve``
    builds them."""
    from mlsys_jax.serve.loading import engine_for

    def make(
        *,
        scheduler: str = "continuous",
        max_seqs: int = 16,
        dtype: str = "float32",
        weights: str = "as-trained",
        kv_cache: str = "auto",
        paged_attention: str = "auto",
        num_blocks: int = NUM_BLOCKS,
        batch_timeout_s: float = BATCH_TIMEOUT_S,
    ) -> Engine:
        fields: dict[str, Any] = {
            "ckpt_dir": ckpt_dir,
            "dtype": dtype,
            "weights": weights,
            "scheduler": scheduler,
            "max_seqs": max_seqs,
            "block_size": block_size,
            "num_blocks": num_blocks,
            "prefill_chunk": prefill_chunk,
            "batch_timeout_ms": batch_timeout_s * 1e3,
            "kv_cache": kv_cache,
            "paged_attention": paged_attention,
        }
        cfg = ServeConfig(**fields)
        engine = engine_for(cfg)
        assert isinstance(engine, Engine), "one replica expected"
        return engine

    return make


def random_factory(model_name: str = "tiny", *, context: int = 128, prefill_chunk: int = 64):
    """Engines of a freshly initialized ``llama:<model_name>`` (byte tokenizer): real speed,
    meaningless text; for tests and for trying the bench without a trained run."""
    from mlsys_jax.models import get_config, llama
    from mlsys_jax.models.quantized import quantize_params
    from mlsys_jax.serve.loading import replica_plans
    from mlsys_jax.tokenizer import ByteTokenizer

    plan = replica_plans(None)[0]
    cache: dict[tuple[str, str], Any] = {}

    def make(
        *,
        scheduler: str = "continuous",
        max_seqs: int = 16,
        dtype: str = "float32",
        weights: str = "as-trained",
        kv_cache: str = "auto",
        paged_attention: str = "auto",
        num_blocks: int = NUM_BLOCKS,
        batch_timeout_s: float = BATCH_TIMEOUT_S,
    ) -> Engine:
        config = get_config(model_name, dtype=dtype, paged_attention_impl=paged_attention)
        model = llama.language_model(config, f"llama:{model_name}")
        if (dtype, weights) not in cache:
            params = plan.init(model.specs, jax.random.key(0))
            if weights == "int8":
                params = jax.jit(lambda p: quantize_params(p, model.quantizable))(params)
            cache[(dtype, weights)] = params
        fields: dict[str, Any] = {
            "max_seqs": max_seqs,
            "num_blocks": num_blocks,
            "prefill_chunk": prefill_chunk,
            "scheduler": scheduler,
            "batch_timeout_s": batch_timeout_s,
            "kv_cache": kv_cache,
        }
        engine_config = EngineConfig(**fields)
        return Engine(
            model, plan, cache[(dtype, weights)], ByteTokenizer(), context_limit=context, config=engine_config
        )

    return make


def params_for(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def program_traces(engine: Engine) -> int:
    return sum(engine.compiled.values())


# ---- driving an engine ----------------------------------------------------------------------------
@dataclasses.dataclass
class Replay:
    records: dict[str, Record]
    wall_s: float
    steps: int
    preemptions: int
    traces: int  # programs traced (compiled) while it ran

    def summary(self) -> dict[str, float]:
        out = summarize(list(self.records.values()), self.wall_s)
        out.update(steps=self.steps, preemptions=self.preemptions, programs_compiled_while_timed=self.traces)
        return out


def replay(engine: Engine, requests: Sequence[Request], *, stall_s: float = 60.0) -> Replay:
    """Feed ``requests`` to ``engine`` by wall clock (each added once its arrival time has passed)
    and step it until every one has finished; timestamps first tokens and finishes."""
    queue = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
    records = {r.request_id: Record(r.arrival_s, r.max_tokens) for r in requests}
    traces, preempted, steps = program_traces(engine), engine.preemptions, 0
    start = time.perf_counter()
    last_progress = 0.0
    while queue or engine.has_work():
        now = time.perf_counter() - start
        while queue and queue[0].arrival_s <= now:
            r = queue.popleft()
            engine.add_request(r.request_id, list(r.prompt), params_for(r.max_tokens))
        if not engine.has_work():
            time.sleep(max(0.0, queue[0].arrival_s - (time.perf_counter() - start)))
            continue
        outputs = engine.step()
        steps += 1
        t = time.perf_counter() - start
        for out in outputs:
            rec = records[out.request_id]
            if rec.first_s is None:
                rec.first_s = t
            rec.tokens = out.completion_tokens
            if out.finish_reason is not None:
                rec.finish_s, rec.reason = t, out.finish_reason
        if outputs:
            last_progress = t
        elif engine.stats()["running"] == 0:  # a batching scheduler waiting for more requests
            if not queue and t - last_progress > stall_s:
                raise RuntimeError(
                    f"the engine made no progress for {stall_s:.0f} s with {engine.stats()['waiting']} requests "
                    "waiting and none left to arrive (a static batch that can never fill?)"
                )
            time.sleep(min(0.001, max(0.0, queue[0].arrival_s - t)) if queue else 0.001)
    finishes = [r.finish_s for r in records.values() if r.finish_s is not None]
    return Replay(
        records,
        max(finishes) if finishes else time.perf_counter() - start,
        steps,
        engine.preemptions - preempted,
        program_traces(engine) - traces,
    )


def warm_up(engine: Engine, corpus: Sequence[int]) -> None:
    """Compile every program the engine runs: one prompt per prefill bucket, enough requests to
    fill a batch (a static batch starts only when full), a few tokens each."""
    buckets = [b for b in engine.config.chunk_buckets if b + 4 < engine.context_limit]
    n = max(engine.config.max_seqs, len(buckets))
    n = math.ceil(n / engine.config.max_seqs) * engine.config.max_seqs
    stamp = time.perf_counter_ns()
    requests = [Request(f"warm{stamp}-{i}", 0.0, tuple(corpus[i : i + buckets[i % len(buckets)]]), 3) for i in range(n)]
    replay(engine, requests)


def timed(engine: Engine, requests: Sequence[Request]) -> Replay:
    """A replay under fresh request ids (ids must be unique while in the engine)."""
    stamp = time.perf_counter_ns()
    return replay(engine, [dataclasses.replace(r, request_id=f"{r.request_id}-{stamp}") for r in requests])


class Engines:
    """One engine per distinct configuration, built and warmed up on first use."""

    def __init__(
        self, factory: EngineFactory, corpus: Sequence[int], log: Callable[[str], None] = lambda _: None
    ) -> None:
        self.factory, self.corpus, self.log = factory, corpus, log
        self.built: dict[tuple, Engine] = {}

    def get(self, **config: Any) -> Engine:
        key = tuple(sorted(config.items()))
        if key not in self.built:
            start = time.perf_counter()
            engine = self.factory(**config)
            warm_up(engine, self.corpus)
            self.built[key] = engine
            self.log(f"  built and warmed up {config} in {time.perf_counter() - start:.1f} s")
        return self.built[key]


# ---- the measurements ----------------------------------------------------------------------------
SCHEDULERS: dict[str, dict[str, Any]] = {
    "none (batch 1)": {"scheduler": "continuous", "max_seqs": 1},
    "static (batch 16)": {"scheduler": "static", "max_seqs": 16},
    "dynamic (batch 8 or 50 ms)": {"scheduler": "dynamic", "max_seqs": 8},
    "continuous (16 slots)": {"scheduler": "continuous", "max_seqs": 16},
}


def measure_batching(
    engines: Engines, rates: Sequence[float], n: int, *, seed: int, max_output: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every scheduler against the same Poisson stream at each rate (schedulers interleaved per rate)."""
    rows = []
    for i, rate in enumerate(rates):
        requests = workload(n, rate, seed=seed + i, corpus=engines.corpus, max_output=max_output)
        span = max(r.arrival_s for r in requests)
        offered = sum(r.max_tokens for r in requests) / span if span > 0 else math.inf
        lengths = [r.max_tokens for r in requests]
        utilization = {f"slot_utilization_{b}": slot_utilization(lengths, b) for b in (8, 16)}
        for name, config in SCHEDULERS.items():
            engine = engines.get(**config)
            result = timed(engine, requests)
            row = {"label": name, **config, "rate_per_s": rate, "offered_tokens_per_s": offered, **utilization}
            row.update(result.summary())
            row["saturated"] = bool(row["tokens_per_s"] < 0.9 * row["offered_tokens_per_s"])
            rows.append(row)
            log(
                f"  {name:28s} rate {rate:g}/s: {row['tokens_per_s']:.0f} tok/s, "
                f"p99 latency {row['latency_p99_s']:.2f} s"
            )
    return rows


def measure_jit(
    engines: Engines, requests: Sequence[Request], repeats: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The same burst through the jitted programs and op by op (``jax.disable_jit``), each timed
    after a first run that compiles (per op, for op by op); medians of ``repeats``. Both run the
    XLA paged attention called directly (``paged_attention="xla"``, where the engine has the
    option): the default path wraps it in ``shard_map``, which op by op recompiles every op on
    every call, so op by op would time compilation rather than dispatch."""
    engine = engines.get(scheduler="continuous", max_seqs=16, paged_attention="xla")
    jitted = [timed(engine, requests).summary() for _ in range(repeats)]
    with jax.disable_jit():
        timed(engine, requests)  # every op's own executable compiles here
        eager = [timed(engine, requests).summary() for _ in range(max(1, repeats // 2))]
    out = {
        "jit": median_summary(jitted),
        "op_by_op": median_summary(eager),
        "repeats": repeats,
        "engine": {"scheduler": "continuous", "max_seqs": 16, "paged_attention": "xla"},
    }
    log(f"  jit {out['jit']['tokens_per_s']:.0f} tok/s, op by op {out['op_by_op']['tokens_per_s']:.0f} tok/s")
    return out


def median_summary(summaries: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([s[k] for s in summaries])) for k in summaries[0]}


FP32 = {"dtype": "float32", "weights": "as-trained", "kv_cache": "auto"}
QUANT_VARIANTS: dict[str, dict[str, str]] = {  # each whole, whatever precision the run chose for the rest
    "fp32": FP32,
    "bf16 compute": {**FP32, "dtype": "bfloat16"},
    "int8 weights": {**FP32, "weights": "int8"},
    "int8 KV cache": {**FP32, "kv_cache": "int8"},
}


def measure_variants(
    engines: Engines,
    variants: dict[str, dict[str, str]],
    requests: Sequence[Request],
    repeats: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The same burst on each engine variant (16 slots, continuous); variants interleaved per
    repeat, medians reported; a variant the engine cannot build is recorded as not measured."""
    built: dict[str, Engine] = {}
    out: dict[str, Any] = {}
    for name, variant in variants.items():
        try:
            built[name] = engines.get(scheduler="continuous", max_seqs=16, **variant)
        except NotMeasured as why:
            out[name] = {"not_measured": str(why)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in built}
    for _ in range(repeats):
        for name, engine in built.items():
            runs[name].append(timed(engine, requests).summary())
    for name, summaries in runs.items():
        out[name] = median_summary(summaries)
        log(f"  {name:14s} {out[name]['tokens_per_s']:.0f} tok/s, p50 latency {out[name]['latency_p50_s']:.3f} s")
    return out


def decode_inputs(engine: Engine, length: int) -> tuple[Any, ...]:
    """Arguments of the engine's decode program (``max_seqs`` rows of one token), every row at
    ``length`` cached keys in blocks of its own."""
    rows, bs = engine.config.max_seqs, engine.config.block_size
    length = min(length, engine.context_limit)
    per_row = math.ceil(length / bs)
    if 1 + rows * per_row > engine.config.num_blocks:
        raise ValueError(f"{rows} rows of {length} tokens need more than the pool's {engine.config.num_blocks} blocks")
    tables = np.full((rows, engine.max_blocks), TRASH, np.int32)
    for r in range(rows):
        tables[r, :per_row] = 1 + r * per_row + np.arange(per_row)
    pos = length - 1
    slots = (tables[:, pos // bs] * bs + pos % bs).astype(np.int32)[:, None]
    tokens = np.zeros((rows, 1), np.int32)
    positions = np.full((rows, 1), pos, np.int32)
    lengths = np.full((rows,), length, np.int32)
    last = np.zeros((rows,), np.int32)
    return tokens, positions, slots, tables, lengths, last


def decode_step_probe(engine: Engine, *, length: int, steps: int, rounds: int, ops: bool = False) -> dict[str, Any]:
    """Compile the engine's decode program (as the engine jits it) and time it back to back:
    the compiled HLO's fusion counts and the median over ``rounds`` of ms per step."""
    inputs = decode_inputs(engine, length)
    compiled = engine._forward.lower(engine.params, engine.k_pages, engine.v_pages, *inputs).compile()
    k, v = engine.k_pages, engine.v_pages
    for _ in range(3):
        logits, k, v = compiled(engine.params, k, v, *inputs)
        jax.block_until_ready(logits)
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            logits, k, v = compiled(engine.params, k, v, *inputs)
            jax.block_until_ready(logits)
        per_round.append((time.perf_counter() - start) / steps * 1e3)
    engine.k_pages, engine.v_pages = k, v
    text = compiled.as_text() or ""
    out = {
        "ms_per_step": float(np.median(per_round)),
        "ms_per_step_rounds": per_round,
        "rows": engine.config.max_seqs,
        "cached_tokens": min(length, engine.context_limit),
        "hlo": fusion_stats(text),
    }
    if ops:
        out["ops"] = hlo_ops(text)
        out["param_bytes"] = int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(engine.params)))
        out["pool_sized_copies"] = pool_sized_copies(text, engine)
    return out


HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "s8"}


def pool_sized_copies(hlo: str, engine: Engine) -> int:
    """How many ``copy`` instructions of a compiled program produce a whole K or V pool."""
    pools = {x.shape: x.dtype for x in jax.tree_util.tree_leaves((engine.k_pages, engine.v_pages)) if x.ndim >= 4}
    shapes = {f"{HLO_TYPES.get(str(dt), str(dt))}[{','.join(map(str, shape))}]" for shape, dt in pools.items()}
    count = 0
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(\S+?)\{[^}]*\}\s+copy\(", line)
        if m and m.group(1) in shapes:
            count += 1
    return count


POOL_PROBE_BLOCKS = 128


def measure_decode_steps(
    engines: Engines, variants: dict[str, dict[str, str]], *, steps: int, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The decode program alone (16 rows at 64 cached tokens) of each variant: ms per step, its
    compiled HLO's converts and dot types; and fp32 and int8 KV pools at two pool sizes, to show
    whether a step's time follows the pool's size."""
    out: dict[str, Any] = {}
    for name, variant in variants.items():
        for blocks in (NUM_BLOCKS, POOL_PROBE_BLOCKS):
            if blocks != NUM_BLOCKS and name not in ("fp32", "int8 KV cache"):
                continue
            try:
                size = {} if blocks == NUM_BLOCKS else {"num_blocks": blocks}  # the burst's engines are reused
                engine = engines.get(scheduler="continuous", max_seqs=16, **size, **variant)
            except NotMeasured as why:
                out[name] = {"not_measured": str(why)}
                break
            probe = decode_step_probe(engine, length=64, steps=steps, rounds=rounds, ops=True)
            probe["num_blocks"] = blocks
            probe["kv_pool_bytes"] = pool_bytes(engine)
            out[name if blocks == NUM_BLOCKS else f"{name}, {blocks} blocks"] = probe
            log(
                f"  decode step, {name}, {blocks} blocks ({probe['kv_pool_bytes'] / 2**20:.1f} MiB of K/V pools): "
                f"{probe['ms_per_step']:.2f} ms; {probe['ops'].get('convert', 0)} converts, "
                f"dots { ({k: v for k, v in probe['ops'].items() if k.startswith('dot:')}) }"
            )
    return out


def pool_bytes(engine: Engine) -> int:
    leaves = jax.tree_util.tree_leaves((engine.k_pages, engine.v_pages))
    return int(sum(x.size * x.dtype.itemsize for x in leaves))


def probe_env(flags: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if flags:
        out["XLA_FLAGS"] = flags
    return out


def measure_xla_fusion(
    source: list[str], *, steps: int, rounds: int, alternations: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """The engine's decode step compiled on CPU with and without XLA's fusion pass, each in a
    subprocess of its own (XLA reads XLA_FLAGS once, at start), the two modes alternating
    ``alternations`` times; ms per step is the median over all of a mode's rounds."""
    out: dict[str, Any] = {"flag": FUSION_FLAG}
    for _ in range(alternations):
        for mode, flags in (("fused", ""), ("unfused", FUSION_FLAG)):
            command = [sys.executable, str(Path(__file__).resolve()), "--fusion-probe", *source]
            command += ["--probe-steps", str(steps), "--probe-rounds", str(rounds)]
            done = subprocess.run(
                command, check=False, env=probe_env(flags), capture_output=True, text=True, timeout=900
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise NotMeasured(f"the {mode} probe failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
            probe = json.loads(lines[-1])
            if mode in out:
                out[mode]["ms_per_step_rounds"] += probe["ms_per_step_rounds"]
            else:
                out[mode] = probe
            out[mode]["ms_per_step"] = float(np.median(out[mode]["ms_per_step_rounds"]))
            log(f"  decode step, {mode}: {probe['ms_per_step']:.2f} ms, HLO {probe['hlo']}")
    fused, unfused = out["fused"]["hlo"], out["unfused"]["hlo"]
    out["flag_verified"] = (
        unfused["multi_op_fusions"] < fused["multi_op_fusions"] and unfused["kernels"] > fused["kernels"]
    )
    return out


def paged_kernel_times(
    implementations: Sequence[str],
    *,
    batch: int = 32,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    context: int = 2048,
    dtype: Any = "bfloat16",
    repeats: int = 20,
) -> dict[str, float]:
    """Seconds per jitted decode-shaped ``paged_attention`` call (one query per row, every row at
    ``context`` keys) for each implementation (median of ``repeats``)."""
    import functools

    import jax.numpy as jnp

    from mlsys_jax.kernels.autotune import time_call
    from mlsys_jax.kernels.paged_attention import paged_attention

    per_row = math.ceil(context / block_size)
    blocks = 1 + batch * per_row
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, 1, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (blocks, block_size, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (blocks, block_size, kv_heads, head_dim), dtype)
    tables = jnp.asarray(1 + np.arange(batch * per_row, dtype=np.int32).reshape(batch, per_row))
    lengths = jnp.full((batch,), context, jnp.int32)
    out = {}
    for impl in implementations:
        call = jax.jit(functools.partial(paged_attention, implementation=impl))
        out[impl] = time_call(lambda call=call: call(q, k, v, tables, lengths), repeats)
    return out


# ---- the technique table ---------------------------------------------------------------------------
def technique_row(
    technique: str,
    label: str,
    compared: str,
    latency: float | None,
    throughput: float | None,
    *,
    why: Callable[[str, str], str | None] | None = None,
    note: str | None = None,
    not_measured: str | None = None,
) -> dict[str, Any]:
    """One row of the technique table: measured changes (percent), the published ranges, the
    verdicts, and ``why(latency_verdict, throughput_verdict)`` when a figure falls off its range."""
    pub = PUBLISHED[technique]
    if not_measured:
        lat_v = thr_v = "not measured"
        reason: str | None = f"not measured: {not_measured}"
    else:
        lat_v, thr_v = verdict(latency, pub["latency"]), verdict(throughput, pub["throughput"])
        off = any(v in ("above", "below") for v in (lat_v, thr_v))
        reason = why(lat_v, thr_v) if why is not None and off else None
    return {
        "technique": label,
        "published_as": technique,
        "compared": compared,
        "latency_reduction_pct": latency,
        "throughput_increase_pct": throughput,
        "published_latency_reduction_pct": pub["latency"],
        "published_throughput_increase_pct": pub["throughput"],
        "published_text": pub["text"],
        "latency_verdict": lat_v,
        "throughput_verdict": thr_v,
        "why": reason,
        "note": note,
    }


def slot_utilization(lengths: Sequence[int], batch: int) -> float:
    """The share of a static batch's decode slots that hold a live sequence when requests are
    batched ``batch`` at a time in arrival order and every batch decodes until its longest
    request ends: sum(lengths) / sum(batch * longest of each batch)."""
    groups = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    return sum(lengths) / sum(batch * max(g) for g in groups)


def _join(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return "; ".join(kept) if kept else None


def techniques(results: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The technique table's rows from the measurements (every technique has a row; one not
    measured says why)."""
    rows: list[dict[str, Any]] = []
    skipped = "not run (--only)"
    steps = results.get("decode_step", {})

    def step_ms(name: str) -> float | None:
        return steps.get(name, {}).get("ms_per_step")

    def dots(name: str) -> str:
        ops = steps.get(name, {}).get("ops", {})
        return ", ".join(f"{v} {k[4:]}" for k, v in sorted(ops.items()) if k.startswith("dot:")) or "?"

    def converts(name: str) -> int:
        return int(steps.get(name, {}).get("ops", {}).get("convert", 0))

    # static graph compilation
    jit = results.get("jit")
    label = "static graph compilation (jit)"
    if not jit:
        rows.append(
            technique_row("static graph compilation", label, "jit vs op by op", None, None, not_measured=skipped)
        )
    else:
        base, var = jit["op_by_op"], jit["jit"]
        rows.append(
            technique_row(
                "static graph compilation",
                label,
                "jit vs op by op: p50 request latency / tok/s",
                latency_reduction_pct(base["latency_p50_s"], var["latency_p50_s"]),
                throughput_increase_pct(base["tokens_per_s"], var["tokens_per_s"]),
                why=lambda lat, thr: (
                    f"op by op, every engine step runs the model's jnp ops one at a time from Python: a decode step "
                    f"took {base['tpot_p50_s'] * 1e3:.0f} ms against {var['tpot_p50_s'] * 1e3:.1f} ms compiled. "
                    "On a model this small, per-op dispatch dwarfs the arithmetic; the quoted range is for models "
                    "whose kernels dominate"
                    if "above" in (lat, thr)
                    else "per-op dispatch is a small share of a step here"
                ),
            )
        )
    # quantization
    quant = results.get("quantization", {})
    fp32 = quant.get("fp32")
    quant_why = {
        "bf16 compute": lambda lat, thr: (
            f"XLA's CPU backend compiled the bf16 decode step's matmuls as {dots('bf16 compute')} dots, with "
            f"{converts('bf16 compute')} converts against {converts('fp32')} in fp32: bf16 adds conversions and "
            f"gets no faster matmul here (decode step {step_ms('bf16 compute') or float('nan'):.2f} ms vs "
            f"{step_ms('fp32') or float('nan'):.2f} ms)"
        ),
        "int8 weights": lambda lat, thr: (
            f"the int8 weights are widened before every matmul ({dots('int8 weights')} dots, "
            f"{converts('int8 weights')} converts); this model's "
            f"{steps.get('fp32', {}).get('param_bytes', 0) / 2**20:.1f} MiB of fp32 weights are not what a step "
            f"waits on here (decode step {step_ms('int8 weights') or float('nan'):.2f} ms vs "
            f"{step_ms('fp32') or float('nan'):.2f} ms)"
        ),
        "int8 KV cache": lambda lat, thr: (
            f"a decode step reads only its rows' blocks and writes the pools in place, so the cache's bytes are not "
            f"what it waits on here, and widening int8 pages adds work (decode step "
            f"{step_ms('int8 KV cache') or float('nan'):.2f} ms vs {step_ms('fp32') or float('nan'):.2f} ms); what "
            "int8 buys is memory: a quarter of fp32's cache bytes, so 4x the tokens in the same pool"
        ),
    }
    kv_note = pool_fact = None
    small = f"fp32, {POOL_PROBE_BLOCKS} blocks"
    copied = steps.get("fp32", {}).get("pool_sized_copies", 0)
    if copied and "ms_per_step" in steps.get("fp32", {}) and "ms_per_step" in steps.get(small, {}):
        big_s, small_s = steps["fp32"], steps[small]
        pool_fact = (
            f"the compiled decode step copies whole K/V pools {big_s.get('pool_sized_copies', '?')} times per step, "
            f"so its time follows the pool's size (fp32: {small_s['ms_per_step']:.2f} ms with "
            f"{small_s['kv_pool_bytes'] / 2**20:.0f} MiB of pools, {big_s['ms_per_step']:.2f} ms with "
            f"{big_s['kv_pool_bytes'] / 2**20:.0f} MiB)"
        )
        kv_note = f"most of this gain is a copy, not attention: {pool_fact}, and int8 pools are a quarter of the bytes"
    for name in ("bf16 compute", "int8 weights", "int8 KV cache"):
        entry = quant.get(name)
        label = f"quantization: {name}"
        if fp32 is None or entry is None or "not_measured" in entry or "not_measured" in fp32:
            reason = (entry or {}).get("not_measured") or skipped
            rows.append(technique_row("FP16 quantization", label, "vs fp32", None, None, not_measured=reason))
            continue
        rows.append(
            technique_row(
                "FP16 quantization",
                label,
                "vs fp32: p50 request latency / tok/s",
                latency_reduction_pct(fp32["latency_p50_s"], entry["latency_p50_s"]),
                throughput_increase_pct(fp32["tokens_per_s"], entry["tokens_per_s"]),
                why=quant_why[name],
                note=kv_note if name == "int8 KV cache" else None,
            )
        )
    # kernel fusion: the Pallas kernel
    pallas = results.get("pallas", {})
    in_engine = pallas.get("engine", {})
    label = "kernel fusion (Pallas paged attention)"

    def pallas_why(lat: str, thr: str) -> str:
        return "this bench does not break the difference down; the per-variant figures are under 'pallas'"

    if all("tokens_per_s" in in_engine.get(k, {}) for k in ("xla", "pallas")):
        a, b = in_engine["xla"], in_engine["pallas"]
        rows.append(
            technique_row(
                "kernel fusion",
                label,
                "engine: pallas vs xla paged attention, p50 request latency / tok/s",
                latency_reduction_pct(a["latency_p50_s"], b["latency_p50_s"]),
                throughput_increase_pct(a["tokens_per_s"], b["tokens_per_s"]),
                why=pallas_why,
            )
        )
    elif "xla" in pallas.get("seconds", {}) and "pallas_triton" in pallas.get("seconds", {}):
        t = pallas["seconds"]
        rows.append(
            technique_row(
                "kernel fusion",
                label,
                "pallas_triton vs xla, one decode-shaped call",
                latency_reduction_pct(t["xla"], t["pallas_triton"]),
                throughput_increase_pct(1 / t["xla"], 1 / t["pallas_triton"]),
                why=pallas_why,
            )
        )
    else:
        reason = pallas.get("not_measured") or pallas.get("kernel_not_measured") or skipped
        rows.append(technique_row("kernel fusion", label, "pallas vs xla", None, None, not_measured=reason))
    # kernel fusion: XLA's fusion pass
    fusion = results.get("xla_fusion", {})
    label = "kernel fusion (XLA's fusion passes)"
    compared = f"decode step, fused vs {FUSION_FLAG}"
    if "fused" in fusion and "unfused" in fusion and fusion.get("flag_verified"):
        a, b = fusion["unfused"]["ms_per_step"], fusion["fused"]["ms_per_step"]
        hf, hu = fusion["fused"]["hlo"], fusion["unfused"]["hlo"]
        rows.append(
            technique_row(
                "kernel fusion",
                label,
                compared,
                latency_reduction_pct(a, b),
                throughput_increase_pct(1 / a, 1 / b),
                note=(
                    f"fusion took the step from {hu['kernels']} kernels to {hf['kernels']} "
                    f"({hf['multi_op_fusions']} fusions of several ops, against {hu['multi_op_fusions']} without)"
                ),
                why=lambda lat, thr: (
                    f"fusion removed {hu['kernels'] - hf['kernels']} kernels, but much of this step is work it does "
                    "not touch: " + (pool_fact or "see the decode-step figures")
                    if "below" in (lat, thr)
                    else f"a step this small is dominated by per-kernel overhead, and fusion removed "
                    f"{hu['kernels'] - hf['kernels']} of its {hu['kernels']} kernels"
                ),
            )
        )
    else:
        reason = fusion.get("not_measured") or (
            "the flag did not change the compiled HLO (no fewer multi-op fusions)" if fusion else skipped
        )
        rows.append(technique_row("kernel fusion", label, compared, None, None, not_measured=reason))
    # batching
    batching = results.get("batching", [])
    if not batching:
        for technique, label in (
            ("dynamic batching", "dynamic batching (batch 8)"),
            ("continuous batching", "continuous batching"),
        ):
            rows.append(technique_row(technique, label, "-", None, None, not_measured=skipped))
        return rows
    rates = sorted({r["rate_per_s"] for r in batching})
    at = {(r["label"], r["rate_per_s"]): r for r in batching}
    lo, hi = rates[0], rates[-1]
    none, static, dyn, cont = list(SCHEDULERS)
    n1, n8, s16, c16 = at[(none, hi)], at[(dyn, hi)], at[(static, hi)], at[(cont, hi)]
    l1, l8 = at[(none, lo)], at[(dyn, lo)]
    u8, u16 = n8["slot_utilization_8"], n8["slot_utilization_16"]
    predicted = 8 * u8 * n1["tpot_p50_s"] / n8["tpot_p50_s"]

    def dynamic_why(lat: str, thr: str) -> str | None:
        return _join(
            f"batches of 8 kept {u8:.0%} of their slots busy (a batch decodes until its longest request ends) and "
            f"the p50 time per output token was {n8['tpot_p50_s'] * 1e3:.1f} ms in batches of 8 against "
            f"{n1['tpot_p50_s'] * 1e3:.1f} ms alone (a step's cost grows with its rows on this CPU); together these "
            "predict "
            f"{(predicted - 1) * 100:+.0f}%"
            if thr in ("above", "below")
            else None,
            (
                f"at {lo:g}/s the batching wait added to the median time to first token (p50 "
                f"{l1['ttft_p50_s'] * 1e3:.0f} -> {l8['ttft_p50_s'] * 1e3:.0f} ms), but p50 request latency did not "
                "rise"
                + (
                    f": with one slot, a request arriving during another's decode queues behind it (p99 time to "
                    f"first token {l1['ttft_p99_s'] * 1e3:.0f} vs {l8['ttft_p99_s'] * 1e3:.0f} ms)"
                    if l1["ttft_p99_s"] > l8["ttft_p99_s"]
                    else ""
                )
            )
            if lat == "above"
            else None,
        )

    rows.append(
        technique_row(
            "dynamic batching",
            "dynamic batching (batch 8)",
            f"vs batch 1: p50 request latency at {lo:g}/s, tok/s at {hi:g}/s",
            latency_reduction_pct(l1["latency_p50_s"], l8["latency_p50_s"]),
            throughput_increase_pct(n1["tokens_per_s"], n8["tokens_per_s"]),
            why=dynamic_why,
        )
    )
    rows.append(
        technique_row(
            "continuous batching",
            "continuous batching",
            f"vs static batches of 16: p50 request latency at {lo:g}/s, tok/s at {hi:g}/s",
            latency_reduction_pct(at[(static, lo)]["latency_p50_s"], at[(cont, lo)]["latency_p50_s"]),
            throughput_increase_pct(s16["tokens_per_s"], c16["tokens_per_s"]),
            why=lambda lat, thr: (
                f"static batches of 16 kept {u16:.0%} of their slots busy on this workload (outputs "
                f"Exp({settings.get('mean_output_tokens', MEAN_OUTPUT)}) capped at {settings.get('max_output')}), "
                f"so continuous batching could gain at most {1 / u16:.1f}x ({(1 / u16 - 1) * 100:+.0f}%) at equal "
                f"step cost, and its steps also carry prefill chunks (p50 time per output token "
                f"{c16['tpot_p50_s'] * 1e3:.1f} vs {s16['tpot_p50_s'] * 1e3:.1f} ms). Anyscale's up-to-8x came with "
                f"longer, more varied outputs than a {settings.get('context')}-token context allows"
                if thr == "below"
                else None
            ),
        )
    )
    return rows


# ---- output ----------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.0f}%"


def technique_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("technique", "compared", "latency reduction", "published", "verdict"):
        table.add_column(col, justify="right" if col in ("latency reduction", "published") else "left")
    for col in ("throughput increase", "published ", "verdict "):
        table.add_column(col, justify="right" if "verdict" not in col else "left")
    for r in rows:
        table.add_row(
            r["technique"],
            r["compared"],
            _pct(r["latency_reduction_pct"]),
            r["published_text"][0],
            r["latency_verdict"],
            _pct(r["throughput_increase_pct"]),
            r["published_text"][1],
            r["throughput_verdict"],
        )
    return table


def batching_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    cols = ("scheduler", "rate/s", "offered tok/s", "tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "latency p99 s")
    for col in cols:
        table.add_column(col, justify="left" if col == "scheduler" else "right")
    for r in rows:
        table.add_row(
            r["label"],
            f"{r['rate_per_s']:g}",
            f"{r['offered_tokens_per_s']:.0f}",
            f"{r['tokens_per_s']:.0f}" + (" (sat.)" if r["saturated"] else ""),
            f"{r['ttft_p50_s'] * 1e3:.0f} / {r['ttft_p99_s'] * 1e3:.0f}",
            f"{r['tpot_p50_s'] * 1e3:.1f} / {r['tpot_p99_s'] * 1e3:.1f}",
            f"{r['latency_p99_s']:.2f}",
        )
    return table


def picture(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    markers = ["o", "s", "^", "D"]
    offsets = [(6, 6), (6, -12), (-30, 6), (6, -12)]
    for k, name in enumerate(SCHEDULERS):
        pts = sorted((r for r in rows if r["label"] == name), key=lambda r: r["rate_per_s"])
        if not pts:
            continue
        x = [r["tokens_per_s"] for r in pts]
        y = [r["latency_p99_s"] for r in pts]
        (line,) = ax.plot(x, y, marker=markers[k % len(markers)], label=name)
        for r, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(
                f"{r['rate_per_s']:g}/s",
                (xi, yi),
                textcoords="offset points",
                xytext=offsets[k % len(offsets)],
                fontsize=8,
                color=line.get_color(),
            )
    ax.set_xlabel("throughput (generated tokens / s; higher is better)")
    ax.set_ylabel("p99 request latency (s, log scale; lower is better)")
    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.1)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="scheduler (labels: request rate)", fontsize=8, title_fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command -----------------------------------------------------------------------------------
def corpus_for(engine: Engine) -> list[int]:
    """Prompt text: the standard library's JSON decoder (the demo model trains on the standard library)."""
    text = (Path(json.__file__).parent / "decoder.py").read_text()
    ids = [int(t) for t in engine.tokenizer.encode(text)]
    return [t for t in ids if 0 <= t < engine.model.vocab_size]


def source_args(args: argparse.Namespace) -> list[str]:
    """The flags naming the model and the run's precision, for a probe in a subprocess."""
    source = ["--random-model", args.random_model] if args.random_model else ["--ckpt-dir", args.ckpt_dir]
    return [*source, "--dtype", args.dtype, "--weights", args.weights, "--kv-cache", args.kv_cache]


def precision(args: argparse.Namespace) -> str:
    """The run's precision in a few words (the quantization row compares its own choices)."""
    parts = ["fp32" if args.dtype == "float32" else "bf16"]
    parts += ["int8 weights"] if args.weights == "int8" else []
    parts += ["int8 KV cache"] if args.kv_cache == "int8" else []
    return ", ".join(parts)


def factory_for(args: argparse.Namespace) -> EngineFactory:
    """Engines of the chosen model in the run's precision, unless a measurement names its own."""
    if args.random_model:
        base = random_factory(args.random_model, prefill_chunk=16 if args.quick else 64)
    else:
        base = checkpoint_factory(args.ckpt_dir)
    chosen = {"dtype": args.dtype, "weights": args.weights, "kv_cache": args.kv_cache}
    return lambda **config: base(**{**chosen, **config})


def fusion_probe(args: argparse.Namespace) -> None:
    engine = factory_for(args)(scheduler="continuous", max_seqs=16)
    probe = decode_step_probe(
        engine, length=engine.context_limit // 2, steps=args.probe_steps, rounds=args.probe_rounds
    )
    probe["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(json.dumps(probe))


PARTS = ("quantization", "jit", "fusion", "pallas", "batching")


def run(args: argparse.Namespace, factory: EngineFactory, log: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement ``args.only`` asks for; returns the JSON document (without writing it)."""
    quick, parts = args.quick, set(args.only.split(","))
    rates = [float(r) for r in args.rates.split(",")]
    n = math.ceil(args.requests / 16) * 16  # static batches of 16 must all fill
    results: dict[str, Any] = {}
    first = factory(scheduler="continuous", max_seqs=16)
    corpus = corpus_for(first)
    engines = Engines(factory, corpus, log)
    warm_up(first, corpus)
    engines.built[tuple(sorted({"scheduler": "continuous", "max_seqs": 16}.items()))] = first
    context = first.context_limit
    max_output = min(MAX_OUTPUT, context - PROMPT_TOKENS[1] - 1)
    settings: dict[str, Any] = {
        "parts": sorted(parts),
        "requests_per_rate": n,
        "rates_per_s": rates,
        "mean_output_tokens": MEAN_OUTPUT,
        "max_output": max_output,
        "prompt_tokens": list(PROMPT_TOKENS),
        "context": context,
        "sampling": "greedy; EOS does not end a request (each generates its drawn max_tokens)",
        "block_size": first.config.block_size,
        "num_blocks": first.config.num_blocks,
        "prefill_chunk": first.config.prefill_chunk,
        "dynamic_batch_timeout_s": BATCH_TIMEOUT_S,
        "paged_attention": "the engine's default (auto), except the jit row (xla, see its docstring)",
        "eos": "SamplingParams(ignore_eos=True)",
        "xla_fusion_flag": FUSION_FLAG,
        "schedulers": SCHEDULERS,
        "model": first.model.name,
        "source": " ".join(source_args(args)),
        "precision": precision(args),
        "seed": args.seed,
        "quick": quick,
    }
    if "quantization" in parts:
        burst_n, repeats = (8, 1) if quick else (64, 3)
        burst = workload(burst_n, math.inf, seed=args.seed + 100, corpus=corpus, max_output=max_output, prefix="q")
        settings["quantization_workload"] = (
            f"{burst_n} requests arriving at once, 16 slots, continuous; median of {repeats}"
        )
        log("quantization (fp32, bf16, int8 weights, int8 KV cache) on a burst:")
        results["quantization"] = measure_variants(engines, QUANT_VARIANTS, burst, repeats, log)
        log("the decode step alone, per precision and KV pool size:")
        steps, rounds = (10, 2) if quick else (50, 5)
        results["decode_step"] = measure_decode_steps(engines, QUANT_VARIANTS, steps=steps, rounds=rounds, log=log)
    if "jit" in parts:
        jit_n, jit_tokens, repeats = (2, 4, 1) if quick else (8, 16, 3)
        jit_burst = [
            dataclasses.replace(r, max_tokens=jit_tokens)
            for r in workload(jit_n, math.inf, seed=args.seed + 200, corpus=corpus, prefix="j")
        ]
        settings["jit_workload"] = f"{jit_n} requests of {jit_tokens} tokens arriving at once, 16 slots, continuous"
        log("static graph compilation (jit vs op by op):")
        results["jit"] = measure_jit(engines, jit_burst, repeats, log)
    if "fusion" in parts:
        log("XLA fusion pass on the decode step (subprocesses, alternating):")
        steps, rounds, alternations = (20, 3, 1) if quick else (100, 7, 3)
        settings["xla_fusion_probe"] = (
            f"decode step of 16 rows at half the context cached; {alternations} subprocess(es) per mode, "
            f"each {rounds} rounds of {steps} steps; median of the rounds"
        )
        try:
            results["xla_fusion"] = measure_xla_fusion(
                source_args(args), steps=steps, rounds=rounds, alternations=alternations, log=log
            )
        except (NotMeasured, subprocess.TimeoutExpired) as why:
            results["xla_fusion"] = {"not_measured": str(why)}
    if "pallas" in parts and jax.default_backend() == "gpu":
        results["pallas"] = {}
        burst_n, repeats = (8, 1) if quick else (64, 3)
        burst = workload(burst_n, math.inf, seed=args.seed + 300, corpus=corpus, max_output=max_output, prefix="p")
        log("Pallas paged attention vs XLA gather-then-attend, in the engine (the same burst):")
        results["pallas"]["engine"] = measure_variants(
            engines,
            {"xla": {"paged_attention": "xla"}, "pallas": {"paged_attention": "pallas"}},
            burst,
            repeats,
            log,
        )
        log("Pallas paged attention vs XLA gather-then-attend (one decode-shaped call):")
        try:
            results["pallas"]["seconds"] = paged_kernel_times(("pallas_triton", "xla"))
            results["pallas"]["shape"] = "batch 32, 32 heads, 8 K/V heads, head_dim 128, 2048 cached tokens, bf16"
        except Exception as err:  # noqa: BLE001 - a kernel that cannot run here is reported, not fatal
            results["pallas"]["kernel_not_measured"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    elif "pallas" in parts:
        results["pallas"] = {
            "not_measured": f"on {jax.default_backend()} the Pallas paged-attention kernel runs only interpreted "
            "(the backend order for this platform lists xla alone), so its speed means nothing here; it needs a GPU"
        }
    if "batching" in parts:
        log(f"batching: {n} requests per rate at {', '.join(f'{r:g}' for r in rates)} per second:")
        results["batching"] = measure_batching(engines, rates, n, seed=args.seed, max_output=max_output, log=log)
    return {"settings": settings, **results, "techniques": techniques(results, settings)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ckpt-dir", default=DEFAULT_CKPT, help="a training run (make demo trains runs/train_lm)")
    parser.add_argument("--random-model", default=None, help="a freshly initialized llama config (e.g. tiny) instead")
    parser.add_argument("--requests", type=int, default=128, help="requests per rate (rounded up to a multiple of 16)")
    parser.add_argument("--rates", default="4,16,128", help="requests per second, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny run: 16 requests at one rate, short bursts")
    parser.add_argument("--out", default=str(RESULTS), help="folder for serving.json and the PNG")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--weights", choices=("as-trained", "int8"), default="as-trained", help="int8: weight-only")
    parser.add_argument("--kv-cache", choices=("auto", "int8"), default="auto", help="int8: an int8 KV cache")
    parser.add_argument("--fusion-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--probe-rounds", type=int, default=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.requests == parser.get_default("requests"):
        args.requests = 16
    if args.quick and args.rates == parser.get_default("rates"):
        args.rates = "64"
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if not args.random_model and not has_checkpoint(args.ckpt_dir):
        print(
            f"error: no checkpoint in {args.ckpt_dir!r}. Fix: run `make demo` first (it trains one into "
            f"{DEFAULT_CKPT}), or give --ckpt-dir of a training run.",
            file=sys.stderr,
        )
        return 2
    if args.fusion_probe:
        fusion_probe(args)
        return 0
    console = Console(width=200)
    started = time.perf_counter()
    doc = run(
        args,
        factory_for(args),
        lambda line: console.print(f"[{time.perf_counter() - started:5.0f} s] {line}", highlight=False),
    )
    seconds = time.perf_counter() - started
    device = jax.devices()[0].device_kind
    doc = {
        "benchmark": "serving",
        "device": device,
        "backend": jax.default_backend(),
        "devices_used": 1,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "run_seconds": seconds,
        **doc,
    }
    where = f"model {doc['settings']['model']}, {precision(args)}, one {device} device ({os.cpu_count()} cores)"
    if jax.default_backend() != "cpu":
        where = f"model {doc['settings']['model']}, {precision(args)}, one {device}"
    console.print(technique_table(doc["techniques"], f"Serving techniques, measured on our engine: {where}"))
    for r in doc["techniques"]:
        for kind in ("why", "note"):
            if r[kind]:
                console.print(f"  {r['technique']} ({kind}): {r[kind]}", highlight=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    wrote = [out / "serving.json"]
    if doc.get("batching"):
        n = doc["settings"]["requests_per_rate"]
        console.print(batching_table(doc["batching"], f"Batching: {n} requests per rate"))
        slug = "cpu" if jax.default_backend() == "cpu" else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
        title = (
            f"{n} requests per rate, Poisson arrivals, Exp({MEAN_OUTPUT}) output tokens "
            f"(cap {doc['settings']['max_output']})\n{where}"
        )
        picture(doc["batching"], out / f"serving-{slug}.png", title)
        wrote.append(out / f"serving-{slug}.png")
    console.print(f"wrote {', '.join(str(p) for p in wrote)} in {seconds:.0f} s", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
