"""Weak-scaling efficiency of data parallelism under the alpha-beta model of ``comm.models``.

Each of N workers runs the same per-worker batch (weak scaling), then all-reduces its gradients
with one algorithm over the network's links. A step takes the compute time plus the all-reduce
(no overlap), or the compute time plus whatever of the all-reduce the compute cannot hide
(``overlap``: the share of the compute the all-reduce can run behind; 1 is the bound where only
the excess of communication over compute shows). Efficiency is t(1) / t(N): 1 at N = 1, where
nothing is reduced. Pure arithmetic: no JAX, so a planner can price a machine it does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mlsys_jax.comm.models import AlphaBeta, cost, time_on


@dataclasses.dataclass(frozen=True)
class Network:
    """The links a data-parallel all-reduce crosses: ``inner`` within a node of ``node_size``
    consecutive devices, ``outer`` between nodes (no ``node_size``: one network of ``inner``)."""

    inner: AlphaBeta
    outer: AlphaBeta | None = None
    node_size: int | None = None

    @classmethod
    def of_preset(cls, preset: Any) -> Network:
        """From a mesh preset: a multi-slice one's slices are the nodes, joined by the link of
        its axis that spans slices (DCN); within a node, or in a one-slice preset, the slowest
        link of the other axes (a data-parallel group spans them all)."""
        across = [a for a in preset.axes if a.slices > 1]
        within = [a for a in preset.axes if a.slices == 1] or list(preset.axes)
        inner = _slowest([preset.links[a.link] for a in within])
        if not across:
            return cls(AlphaBeta.of_link(inner))
        outer = _slowest([preset.links[a.link] for a in across])
        return cls(AlphaBeta.of_link(inner), AlphaBeta.of_link(outer), preset.num_devices // preset.num_slices)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One worker's step: ``compute_s`` seconds of compute at its batch, then ``grad_bytes``
    of gradients all-reduced."""

    compute_s: float
    grad_bytes: float

    def __post_init__(self) -> None:
        if not self.compute_s > 0 or self.grad_bytes < 0:
            raise ValueError(f"compute_s must be positive and grad_bytes non-negative, got {self}")

    @classmethod
    def of_flops(cls, flops_per_step: float, flops_per_s: float, grad_bytes: float, mfu: float = 1.0) -> Workload:
        """From a step's FLOPs on one worker and a device's FLOP rate, at ``mfu`` of that rate."""
        if not 0 < mfu <= 1:
            raise ValueError(f"mfu must be within (0, 1], got {mfu}")
        return cls(flops_per_step / (flops_per_s * mfu), grad_bytes)


@dataclasses.dataclass(frozen=True)
class ScalingPoint:
    """The predicted step at N workers, without and with overlap, and its weak-scaling efficiency."""

    n: int
    compute_s: float
    comm_s: float
    step_s: float
    step_overlap_s: float
    efficiency: float
    efficiency_overlap: float


def comm_seconds(algorithm: str, n: int, grad_bytes: float, network: Network) -> float:
    """Seconds of one all-reduce of ``grad_bytes`` over ``n`` workers (0 for one worker). The
    hierarchical one uses the nodes as its inner axis; a single server is a dedicated one."""
    if n == 1:
        return 0.0
    kwargs: dict[str, Any] = {"node_size": network.node_size}
    if algorithm == "hierarchical":
        inner = min(n, network.node_size or n)
        if n % inner:
            raise ValueError(f"hierarchical all-reduce needs n a multiple of the node size: n={n}, node {inner}")
        kwargs.update(inner=inner, outer=n // inner)
    return time_on(cost(algorithm, n, grad_bytes, **kwargs), network.inner, network.outer)


def step(
    workload: Workload,
    network: Network,
    algorithm: str,
    n: int,
    *,
    overlap: float = 1.0,
    shared_host: float | None = None,
) -> ScalingPoint:
    """The step at ``n`` workers. ``shared_host``: the workers share one host that runs that
    many of them at full speed at once (simulated devices), so compute grows as
    ``max(1, n / shared_host)``; None: each worker has its own device."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be within [0, 1], got {overlap}")
    if shared_host is not None and not shared_host > 0:
        raise ValueError(f"shared_host must be positive, got {shared_host}")
    compute = workload.compute_s * (max(1.0, n / shared_host) if shared_host else 1.0)
    comm = comm_seconds(algorithm, n, workload.grad_bytes, network)
    serial = compute + comm
    overlapped = compute + max(0.0, comm - overlap * compute)
    return ScalingPoint(
        n=n,
        compute_s=compute,
        comm_s=comm,
        step_s=serial,
        step_overlap_s=overlapped,
        efficiency=workload.compute_s / serial,
        efficiency_overlap=workload.compute_s / overlapped,
    )


def scaling(
    workload: Workload,
    network: Network,
    algorithm: str,
    counts: Sequence[int],
    *,
    overlap: float = 1.0,
    shared_host: float | None = None,
) -> list[ScalingPoint]:
    """``step`` at each worker count."""
    return [step(workload, network, algorithm, n, overlap=overlap, shared_host=shared_host) for n in counts]


def device_counts(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit``, and ``limit`` itself when it is not a power of two."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    out = [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]
    return out if out[-1] == limit else [*out, limit]


def _slowest(links: Sequence[Any]) -> Any:
    return min(links, key=lambda link: (link.bandwidth, -link.latency))
