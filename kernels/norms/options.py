"""The fused norms' block config and the dtypes they take."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mlsys_jax.kernels.blocks import check_positive

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class NormBlocks:
    """Rows of the input per program of a fused norm (a whole feature row is one tile)."""

    block_rows: int = 16
    num_warps: int = 4

    def __post_init__(self) -> None:
        check_positive(self)
