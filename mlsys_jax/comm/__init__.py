"""Collective algorithms written with point-to-point sends, collective matmul for tensor
parallelism, and their alpha-beta costs."""

from mlsys_jax.comm.algorithms import (
    halving_doubling_all_reduce,
    hierarchical_all_reduce,
    parameter_server_step,
    ring_all_reduce,
    sliced_all_reduce,
)
from mlsys_jax.comm.collective_matmul import all_gather_matmul, matmul_reduce_scatter
from mlsys_jax.comm.models import ALGORITHMS, Cost, cost, time_s

__all__ = [
    "ALGORITHMS",
    "Cost",
    "all_gather_matmul",
    "cost",
    "halving_doubling_all_reduce",
    "hierarchical_all_reduce",
    "matmul_reduce_scatter",
    "parameter_server_step",
    "ring_all_reduce",
    "sliced_all_reduce",
    "time_s",
]
