"""Alpha-beta costs of the all-reduce algorithms in ``mlsys_jax.comm.algorithms``.

A cost is the number of sequential message steps (each pays the latency ``alpha``) and the
bytes the busiest device sends (each pays ``beta`` seconds per byte), for an all-reduce of
``nbytes`` bytes per device over ``n`` devices. Padding to whole chunks is ignored. Pure
arithmetic: no JAX, so a planner can price a machine it does not have.
"""

from __future__ import annotations

import dataclasses

#: Algorithm names ``cost`` knows, one per function in ``mlsys_jax.comm.algorithms``.
ALGORITHMS: tuple[str, ...] = ("ring", "halving_doubling", "hierarchical", "parameter_server")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Sequential message steps and bytes sent by the busiest device, for one all-reduce."""

    algorithm: str
    n: int
    nbytes: float
    steps: int
    bytes_per_device: float


def cost(
    algorithm: str,
    n: int,
    nbytes: float,
    *,
    buckets: int = 1,
    inner: int | None = None,
    outer: int | None = None,
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
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes}")
    if algorithm == "ring":
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        steps, sent = 2 * (n - 1) * buckets, 2 * (n - 1) / n * nbytes
    elif algorithm == "halving_doubling":
        p = 1 << (n.bit_length() - 1)
        log_p = p.bit_length() - 1
        fold = n != p
        steps = 2 * log_p + (2 if fold else 0)
        sent = 2 * (p - 1) / p * nbytes + (nbytes if fold else 0.0)
    elif algorithm == "hierarchical":
        a, b = _inner_outer(n, inner, outer)
        steps = 2 * (a - 1) + 2 * (b - 1)
        sent = 2 * (a - 1) / a * nbytes + 2 * (b - 1) / b * (nbytes / a)
    elif algorithm == "parameter_server":
        steps, sent = 2 * (n - 1), 2 * (n - 1) / n * nbytes
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
    return Cost(algorithm=algorithm, n=n, nbytes=float(nbytes), steps=steps, bytes_per_device=float(sent))


def time_s(c: Cost, alpha: float, beta: float) -> float:
    """Seconds under the alpha-beta model: ``alpha`` per step plus ``beta`` per byte sent."""
    return c.steps * alpha + c.bytes_per_device * beta


def _inner_outer(n: int, inner: int | None, outer: int | None) -> tuple[int, int]:
    """Both factors of a hierarchical all-reduce, filling a missing one from ``n``."""
    if inner is None and outer is None:
        raise ValueError("hierarchical cost needs inner= or outer= (the two axis sizes)")
    a = inner if inner is not None else n // (outer or 1)
    b = outer if outer is not None else n // a
    if a < 1 or b < 1 or a * b != n:
        raise ValueError(f"inner x outer must equal n: got inner={inner}, outer={outer}, n={n}")
    return a, b
