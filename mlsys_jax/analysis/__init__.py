"""Analysis of a plan before paying for it: ``analyze`` compiles the train step a plan would run
ahead of time and reports its memory, cost and collectives; the collectives a compiled program
runs are read from its HLO, and priced on a given link."""

from mlsys_jax.analysis.collectives import (
    KINDS,
    Collective,
    KindSummary,
    collectives,
    readings,
    ring_traffic,
    summarize,
)
from mlsys_jax.analysis.compiled_step import Analysis, CollectiveRow, Compiled, analyze
from mlsys_jax.analysis.cost import (
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
from mlsys_jax.analysis.hlo_module import HloParseError, array_shapes, parse_module, parse_replica_groups
from mlsys_jax.analysis.prediction import Prediction, predict

__all__ = [
    "KINDS",
    "Analysis",
    "Collective",
    "CollectiveRow",
    "Compiled",
    "HloParseError",
    "KindSummary",
    "LinkOf",
    "Prediction",
    "analyze",
    "array_shapes",
    "collective_axes",
    "collective_time",
    "collectives",
    "group_axes",
    "parse_module",
    "parse_replica_groups",
    "predict",
    "preset_links",
    "readings",
    "ring_steps",
    "ring_traffic",
    "slowest_link",
    "summarize",
    "total_time",
    "uniform_link",
]
