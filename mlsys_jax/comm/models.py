"""Alpha-beta costs of the all-reduce algorithms in ``mlsys_jax.comm.algorithms``.

A cost is the number of sequential message steps (each pays the latency ``alpha``) and the
bytes the busiest device moves (each pays ``beta`` seconds per byte), for an all-reduce of
``nbytes`` bytes per device over ``n`` devices. Padding to whole chunks is ignored. Pure
arithmetic: no JAX, so a planner can price a machine it does not have.

Two levels of link: with ``node_size`` (devices per node, consecutive ids: a host, a process,
a slice) each step is charged to the ``"inner"`` link when all of its messages stay within nodes,
to ``"outer"`` when all cross between nodes, and to ``"mixed"`` when some do each; a step ends
when its slowest message does, so ``time_on`` prices a mixed step at the slower of the two links
(the outer one on any real machine) unless it is given a figure of its own for mixed steps (a
transport may handle them differently, as gloo does). Each link has its own ``AlphaBeta``, which
``fit_alpha_beta`` can fit to measured permutes (e.g. simulated devices, whose per-step cost is a
synchronisation of every device thread, far above a fused collective's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

#: Algorithm names, one per function in ``mlsys_jax.comm.algorithms``.
ALGORITHMS: tuple[str, ...] = ("ring", "halving_doubling", "hierarchical", "parameter_server")
#: Every name ``cost`` prices: the algorithms and the single-server parameter server.
PATTERNS: tuple[str, ...] = (*ALGORITHMS, "parameter_server_single")
#: Link classes a step can be charged to: within nodes, between them, or some messages of each.
LINKS: tuple[str, ...] = ("inner", "outer", "mixed")

Pairs = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """One class of link as the model prices it: ``alpha`` seconds per step, ``beta`` per byte."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and non-negative, got {value!r}")

    @classmethod
    def of_link(cls, link: Any) -> AlphaBeta:
        """From anything with ``latency`` (s) and ``bandwidth`` (bytes/s), e.g. a preset's ``Link``."""
        return cls(float(link.latency), 1.0 / float(link.bandwidth))

    def seconds(self, steps: float, nbytes: float) -> float:
        return steps * self.alpha + nbytes * self.beta


@dataclasses.dataclass(frozen=True)
class Phase:
    """The steps of one all-reduce charged to one link, and the bytes the busiest device moves in them."""

    link: str
    steps: int
    bytes_per_device: float


@dataclasses.dataclass(frozen=True)
class Cost:
    """Sequential message steps and bytes moved by the busiest device, for one all-reduce;
    ``phases`` splits them by link (one ``"inner"`` phase without a ``node_size``)."""

    algorithm: str
    n: int
    nbytes: float
    steps: int
    bytes_per_device: float
    phases: tuple[Phase, ...] = ()

    def on(self, link: str) -> Phase:
        """Steps and bytes charged to ``link`` (zero when none are)."""
        steps = sum(p.steps for p in self.phases if p.link == link)
        sent = sum(p.bytes_per_device for p in self.phases if p.link == link)
        return Phase(link, steps, sent)


def cost(
    algorithm: str,
    n: int,
    nbytes: float,
    *,
    buckets: int = 1,
    inner: int | None = None,
    outer: int | None = None,
    node_size: int | None = None,
    dedicated_server: bool = True,
) -> Cost:
    """The alpha-beta cost of all-reducing ``nbytes`` per device over ``n`` devices.

    - ``ring``: 2(n-1) steps per bucket (reduce-scatter then all-gather), 2(n-1)/n * V bytes;
      buckets split V, so they add steps but not bytes.
    - ``halving_doubling``: with p = 2^floor(log2 n), 2 log2 p steps and 2(p-1)/p * V bytes;
      when n != p, 2 more steps (fold in, fold out) and V more bytes (a folded device's result).
    - ``hierarchical`` (``inner`` x ``outer`` = n): an inner ring reduce-scatter and all-gather,
      2(inner-1) steps and 2(inner-1)/inner * V bytes, around an outer ring all-reduce of the
      V/inner shard, 2(outer-1) steps and 2(outer-1)/outer * V/inner bytes.
    - ``parameter_server`` (every device owns 1/n of the parameters): n-1 pushes of a V/n
      gradient shard and n-1 pulls of a V/n parameter shard, 2(n-1) steps and 2(n-1)/n * V bytes.
    - ``parameter_server_single`` (one server holds every parameter): each of n workers pushes V
      and pulls V, and the server's link is the bottleneck: it takes in n messages of V one after
      another, then sends n, so 2n steps and 2n * V bytes. With ``dedicated_server=False`` worker
      0 is the server: 2(n-1) steps, 2(n-1) * V bytes.

    ``node_size``: devices per node (consecutive ids); a step whose messages all stay within
    nodes is charged to ``"inner"``, one whose messages all cross to ``"outer"``, one with some of
    each to ``"mixed"``. None: one node, every step inner. A dedicated server sits outside every
    node.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes}")
    if node_size is not None and node_size < 1:
        raise ValueError(f"node_size must be at least 1, got {node_size}")
    v = float(nbytes)
    if algorithm == "ring":
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        steps = [(2 * (n - 1) * buckets, _shift(n, 1), v / n / buckets)] if n > 1 else []
    elif algorithm == "halving_doubling":
        steps = _halving_doubling(n, v)  # the folds count V once: what the busiest device sends
    elif algorithm == "hierarchical":
        a, b = _inner_outer(n, inner, outer)
        steps = []
        if a > 1:  # inner ring: devices o*a .. o*a + a-1 of each group o
            pairs = tuple((o * a + k, o * a + (k + 1) % a) for o in range(b) for k in range(a))
            steps.append((2 * (a - 1), pairs, v / a))
        if b > 1:  # outer ring of each V/a shard: device o*a + k to (o+1)*a + k
            pairs = tuple((o * a + k, ((o + 1) % b) * a + k) for o in range(b) for k in range(a))
            steps.append((2 * (b - 1), pairs, v / a / b))
    elif algorithm == "parameter_server":
        steps = [(2, _shift(n, s), v / n) for s in range(1, n)]
    elif algorithm == "parameter_server_single":
        if dedicated_server:  # the server (-1) apart from every node: n pushes in, then n pulls out
            steps = [(2 * n, ((0, -1),), v)]
        else:
            steps = [(2, ((w, 0),), v) for w in range(1, n)]
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(PATTERNS)}")
    phases = _phases(steps, node_size)
    return Cost(
        algorithm=algorithm,
        n=n,
        nbytes=v,
        steps=sum(p.steps for p in phases),
        bytes_per_device=float(sum(p.bytes_per_device for p in phases)),
        phases=phases,
    )


def time_s(c: Cost, alpha: float, beta: float) -> float:
    """Seconds under the alpha-beta model: ``alpha`` per step plus ``beta`` per byte sent."""
    return c.steps * alpha + c.bytes_per_device * beta


def time_on(c: Cost, inner: AlphaBeta, outer: AlphaBeta | None = None, mixed: AlphaBeta | None = None) -> float:
    """Seconds with each phase priced on its own link (``outer`` defaults to ``inner``); a mixed
    phase on ``mixed`` when given, else at the slower of the two."""
    outer = outer or inner

    def seconds(p: Phase) -> float:
        on = [inner.seconds(p.steps, p.bytes_per_device), outer.seconds(p.steps, p.bytes_per_device)]
        if p.link == "mixed":
            return mixed.seconds(p.steps, p.bytes_per_device) if mixed else max(on)
        return on[0] if p.link == "inner" else on[1]

    return sum(seconds(p) for p in c.phases)


@dataclasses.dataclass(frozen=True)
class Crossover:
    """Where two patterns' modelled times cross: ``below`` is faster under ``nbytes``, ``above``
    over it. ``nbytes`` None: no crossing at a positive size, ``above`` is faster at every size
    (``below`` == ``above``), or ``"tie"`` when the two are equal everywhere."""

    a: str
    b: str
    nbytes: float | None
    below: str
    above: str


def crossover(
    a: str,
    b: str,
    n: int,
    inner: AlphaBeta,
    outer: AlphaBeta | None = None,
    mixed: AlphaBeta | None = None,
    **kwargs: Any,
) -> Crossover:
    """The message size at which ``a`` and ``b`` take the same modelled time (both are linear in
    V: ``t = A + B V``; links as in ``time_on``); ``kwargs`` go to ``cost`` for both."""

    def line(name: str) -> tuple[float, float]:
        t0 = time_on(cost(name, n, 0.0, **kwargs), inner, outer, mixed)
        return t0, time_on(cost(name, n, 1.0, **kwargs), inner, outer, mixed) - t0

    (a0, a1), (b0, b1) = line(a), line(b)
    if math.isclose(a1, b1, rel_tol=1e-9, abs_tol=1e-30):
        if math.isclose(a0, b0, rel_tol=1e-9, abs_tol=1e-30):
            return Crossover(a, b, None, "tie", "tie")
        winner = a if a0 < b0 else b
        return Crossover(a, b, None, winner, winner)
    at = (b0 - a0) / (a1 - b1)
    steeper = a if a1 > b1 else b
    flatter = b if steeper == a else a
    if at <= 0:
        return Crossover(a, b, None, flatter, flatter)
    return Crossover(a, b, at, steeper, flatter)


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> AlphaBeta:
    """``seconds ~ alpha + beta * nbytes`` by least squares on relative error, neither negative
    (one that would be is set to 0 and the other refitted)."""
    if len(nbytes) != len(seconds) or not nbytes:
        raise ValueError("need as many sizes as timings, at least one")
    if any(t <= 0 for t in seconds):
        raise ValueError(f"timings must be positive, got {list(seconds)}")
    rows = [(1.0 / t, s / t) for s, t in zip(nbytes, seconds)]  # (alpha, beta) coefficients, target 1
    saa = sum(r[0] * r[0] for r in rows)
    sab = sum(r[0] * r[1] for r in rows)
    sbb = sum(r[1] * r[1] for r in rows)
    sa = sum(r[0] for r in rows)
    sb = sum(r[1] for r in rows)
    det = saa * sbb - sab * sab
    if len(rows) >= 2 and det > 1e-12 * saa * sbb:
        alpha, beta = (sa * sbb - sb * sab) / det, (sb * saa - sa * sab) / det
        if alpha >= 0 and beta >= 0:
            return AlphaBeta(alpha, beta)
    only_alpha = AlphaBeta(sa / saa, 0.0)
    only_beta = AlphaBeta(0.0, sb / sbb) if sbb > 0 else only_alpha

    def residual(ab: AlphaBeta) -> float:
        return sum((ab.alpha * r[0] + ab.beta * r[1] - 1.0) ** 2 for r in rows)

    return min((only_alpha, only_beta), key=residual)


# ---- step lists ----------------------------------------------------------------------------

#: (how many steps, the messages of one of them as (source, target) pairs, bytes per message).
Steps = list[tuple[int, Pairs, float]]


def _shift(n: int, by: int) -> Pairs:
    return tuple((i, (i + by) % n) for i in range(n))


def _halving_doubling(n: int, v: float) -> Steps:
    if n == 1:
        return []
    p = 1 << (n.bit_length() - 1)
    r = n - p
    device_of = [2 * j if j < r else j + r for j in range(p)]
    steps: Steps = []
    if r:  # odd devices among the first 2r fold into the even ones below them, and back
        steps.append((2, tuple((2 * j + 1, 2 * j) for j in range(r)), v / 2))
    d = p // 2
    while d:  # halving at distance d sends d/p of V; doubling at d the same
        steps.append((2, tuple((device_of[k], device_of[k ^ d]) for k in range(p)), v * d / p))
        d //= 2
    return steps


def _phases(steps: Iterable[tuple[int, Pairs, float]], node_size: int | None) -> tuple[Phase, ...]:
    def link(pairs: Pairs) -> str:
        if node_size is None:
            return "inner"
        crossing = {t < 0 or s // node_size != t // node_size for s, t in pairs if s != t}
        return "mixed" if len(crossing) > 1 else "outer" if True in crossing else "inner"

    totals = {name: [0, 0.0] for name in LINKS}
    for count, pairs, each in steps:
        total = totals[link(pairs)]
        total[0] += count
        total[1] += count * each
    return tuple(Phase(link, int(s), float(b)) for link, (s, b) in totals.items() if s)


def _inner_outer(n: int, inner: int | None, outer: int | None) -> tuple[int, int]:
    """Both factors of a hierarchical all-reduce, filling a missing one from ``n``."""
    if inner is None and outer is None:
        raise ValueError("hierarchical cost needs inner= or outer= (the two axis sizes)")
    a = inner if inner is not None else n // (outer or 1)
    b = outer if outer is not None else n // a
    if a < 1 or b < 1 or a * b != n:
        raise ValueError(f"inner x outer must equal n: got inner={inner}, outer={outer}, n={n}")
    return a, b
