"""What is static about one attention call: its block sizes and its masking options."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mlsys_jax.kernels.blocks import check_positive

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Tiles of flash attention: queries per block and keys per block, forward and backward.

    ``num_warps``/``num_stages`` matter to the Triton lowering only.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_positive(self)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Everything static about one attention call, handed to a backend's forward and backward."""

    causal: bool
    sm_scale: float
    window: int | None = None
    blocks: AttentionBlocks = AttentionBlocks()
    interpret: bool = False
