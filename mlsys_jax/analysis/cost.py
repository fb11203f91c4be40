"""Alpha-beta cost of collectives: each ring step pays the link's latency, each byte its bandwidth.

    time = latency * steps(kind, n) + traffic_bytes / bandwidth

``steps`` is the ring algorithm's: all-reduce 2(n-1) (reduce-scatter then all-gather), all-gather,
reduce-scatter and all-to-all n-1, collective-permute 1; ``traffic_bytes`` is what one device
sends (``Collective.traffic_bytes``). Which link a collective crosses comes from its replica
groups: a group spans the mesh axes along which its members' coordinates differ, and a group
spanning several axes is charged at the slowest of their links. This is a first-order model: no
contention between concurrent collectives and no overlap with compute. A gradient sum run by one
of our own algorithms (``grad_sync``) is priced by that algorithm's steps and bytes instead
(``mlsys_jax.comm.models``, see ``prediction.row_time``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from mlsys_jax.analysis.collectives import Collective
from mlsys_jax.meshes import Link, MeshPreset, PresetError

#: Which link a collective crosses.
LinkOf = Callable[[Collective], Link]


def ring_steps(kind: str, group_size: int) -> int:
    """Latency-bound steps of the ring algorithm for one collective over ``group_size`` devices."""
    n = group_size
    if n <= 1:
        return 0
    if kind == "all-reduce":
        return 2 * (n - 1)
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        return n - 1
    if kind == "collective-permute":
        return 1
    raise ValueError(f"unknown collective kind {kind!r}")


def collective_time(c: Collective, link: Link) -> float:
    """Seconds for one execution of ``c`` over ``link`` (alpha-beta, ring algorithm)."""
    traffic = c.traffic_bytes
    if traffic == 0:
        return 0.0
    return link.latency * ring_steps(c.kind, c.group_size) + traffic / link.bandwidth


def total_time(collectives: Iterable[Collective], link_of: LinkOf) -> float:
    """Seconds for every execution of every collective, run one after another."""
    return sum(c.count * collective_time(c, link_of(c)) for c in collectives)


def group_axes(group: Sequence[int], axis_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes a replica group spans: those along which its members' coordinates differ.

    Ids are partition ids, i.e. row-major positions over ``axis_sizes`` in its order (pass
    ``dict(mesh.shape)``, which keeps the mesh's axis order).
    """
    names = list(axis_sizes)
    sizes = [axis_sizes[a] for a in names]
    total = math.prod(sizes)

    def coords(i: int) -> list[int]:
        if not 0 <= i < total:
            raise ValueError(f"device id {i} is outside a mesh of {total} devices {dict(axis_sizes)}")
        out = []
        for s in reversed(sizes):
            out.append(i % s)
            i //= s
        return out[::-1]

    points = [coords(i) for i in group]
    return tuple(a for k, a in enumerate(names) if len({p[k] for p in points}) > 1)


def collective_axes(c: Collective, axis_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """Every mesh axis any of the collective's groups (or permute pairs) spans, in mesh order."""
    groups = list(c.groups) + [tuple(p) for p in c.pairs if p[0] != p[1]]
    spanned = {a for g in groups for a in group_axes(g, axis_sizes)}
    return tuple(a for a in axis_sizes if a in spanned)


def slowest_link(links: Iterable[Link]) -> Link:
    """The link with the least bandwidth (ties: the most latency)."""
    return min(links, key=lambda link: (link.bandwidth, -link.latency))


def uniform_link(link: Link) -> LinkOf:
    """Every collective crosses the same link (e.g. one NVLink node)."""
    return lambda c: link


def preset_links(preset: MeshPreset, axis_sizes: Mapping[str, int], default: Link | None = None) -> LinkOf:
    """Links from a preset: each collective is charged at the slowest link among the axes its
    groups span. Axes the preset does not list take ``default`` (an error if None)."""

    def link_of(c: Collective) -> Link:
        axes = collective_axes(c, axis_sizes)
        found = []
        for a in axes:
            try:
                found.append(preset.link_of(a))
            except PresetError:
                if default is None:
                    raise
                found.append(default)
        if not found:  # a group of one device: no link is crossed, any will do
            found = [default] if default is not None else list(preset.links.values())
        return slowest_link(found)

    return link_of
