"""Collective algorithms written with point-to-point sends, and their alpha-beta costs."""

from mlsys_jax.comm.algorithms import (
    halving_doubling_all_reduce,
    hierarchical_all_reduce,
    parameter_server_step,
    ring_all_reduce,
)
from mlsys_jax.comm.models import ALGORITHMS, Cost, cost, time_s

__all__ = [
    "ALGORITHMS",
    "Cost",
    "cost",
    "halving_doubling_all_reduce",
    "hierarchical_all_reduce",
    "parameter_server_step",
    "ring_all_reduce",
    "time_s",
]
