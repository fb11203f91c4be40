"""The server's Prometheus metrics, in a registry of its own (two apps in one process never share
or clash): the engine's state as gauges, tokens generated, latency histograms (time to first
token, time per output token, whole request) and requests counted by outcome.

The runner reports timings and tokens as they happen (``RunnerObserver``); the gauges are set
from the runner's stats snapshot when ``/metrics`` is scraped, so scraping never touches the
engine.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NAMESPACE = "mlsys_jax"

#: Request outcomes counted in ``mlsys_jax_requests_total{outcome=...}``.
OUTCOMES = (
    "finished",
    "aborted",
    "error",
    "bad_request_400",
    "not_found_404",
    "rejected_429",
    "unavailable_503",
)

#: The window of the recent-throughput gauge.
THROUGHPUT_WINDOW_S = 10.0

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

#: Gauges set from the runner's stats: (stats key, metric name, help).
GAUGES = (
    ("queued", "requests_waiting", "Requests waiting to be admitted into an engine slot (the queue bound's count)."),
    ("running", "requests_running", "Sequences the engine is prefilling or decoding."),
    ("kv_blocks_used", "kv_blocks_used", "KV-cache blocks held by running sequences."),
    ("kv_blocks_total", "kv_blocks_capacity", "KV-cache blocks in the pool."),
    ("kv_cache_bytes", "kv_cache_bytes", "Bytes the KV-cache pools take (int8 values and scales, or the dtype's)."),
    (
        "programs_compiled",
        "programs_compiled",
        "Programs the engine has compiled (a rise under load means shape churn).",
    ),
    ("preemptions", "preemptions", "Sequences preempted so far to free KV blocks (they are recomputed later)."),
)


class ServeMetrics:
    """One server's metrics; ``render(stats)`` gives the Prometheus text exposition. Safe to call
    from the engine thread and the event loop at once."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self.gauges = {key: Gauge(name, doc, namespace=ns, registry=r) for key, name, doc in GAUGES}
        self.tokens_total = Counter(
            "generation_tokens", "Tokens generated (tokens/s: rate() of this).", namespace=ns, registry=r
        )
        self.throughput = Gauge(
            "generation_tokens_per_second",
            f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s.",
            namespace=ns,
            registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated token (queueing and prefill).",
            namespace=ns,
            registry=r,
            buckets=TTFT_BUCKETS,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "A request's decode time per token after the first.",
            namespace=ns,
            registry=r,
            buckets=TPOT_BUCKETS,
        )
        self.latency = Histogram(
            "request_latency_seconds",
            "From a request's arrival to its last token.",
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter("requests", "Requests by outcome.", ["outcome"], namespace=ns, registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._started = time.monotonic()

    # RunnerObserver: called by the engine thread.
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, count: int) -> None:
        self.tokens_total.inc(count)
        with self._lock:
            self._recent.append((time.monotonic(), count))

    def request_done(self, outcome: str, *, time_per_output_token: float | None, latency: float) -> None:
        self.count(outcome)
        if outcome == "finished":
            self.latency.observe(latency)
            if time_per_output_token is not None:
                self.tpot.observe(time_per_output_token)

    # The server's side.
    def count(self, outcome: str) -> None:
        """Count a request's outcome (one of ``OUTCOMES``)."""
        self.requests.labels(outcome).inc()

    def recent_throughput(self) -> float:
        """Tokens per second over the last ``THROUGHPUT_WINDOW_S`` (or since start, if shorter)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            tokens = sum(n for _, n in self._recent)
        return tokens / max(min(THROUGHPUT_WINDOW_S, now - self._started), 1e-3)

    def render(self, stats: Mapping[str, float]) -> bytes:
        """The text exposition, with the gauges set from ``stats`` (the runner's snapshot)."""
        for key, gauge in self.gauges.items():
            if key in stats:  # an engine without a key leaves its gauge at 0
                gauge.set(float(stats[key]))
        self.throughput.set(self.recent_throughput())
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE_LATEST", "OUTCOMES", "ServeMetrics"]
