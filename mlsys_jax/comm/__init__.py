"""Communication: the collectives a compiled program runs, and what they cost on a given link."""

from mlsys_jax.comm.cost import (
    LinkOf,
    collective_axes,
    collective_time,
    group_axes,
    preset_links,
    ring_steps,
    slowest_link,
    total_time,
    uniform_link,
)
from mlsys_jax.comm.hlo import (
    KINDS,
    Collective,
    HloParseError,
    KindSummary,
    collectives,
    parse_replica_groups,
    readings,
    ring_traffic,
    summarize,
)

__all__ = [
    "KINDS",
    "Collective",
    "HloParseError",
    "KindSummary",
    "LinkOf",
    "collective_axes",
    "collective_time",
    "collectives",
    "group_axes",
    "parse_replica_groups",
    "preset_links",
    "readings",
    "ring_steps",
    "ring_traffic",
    "slowest_link",
    "summarize",
    "total_time",
    "uniform_link",
]
