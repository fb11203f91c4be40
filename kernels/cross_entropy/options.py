"""What is static about one fused linear cross-entropy call: its tiles and options."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mlsys_jax.kernels.blocks import check_positive

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class LossBlocks:
    """Tokens and vocabulary entries per tile of the fused linear cross-entropy."""

    block_tokens: int = 64
    block_vocab: int = 512
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        check_positive(self)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Everything static about one call, handed to a backend."""

    ignore_index: int = -100
    z_loss: float = 0.0
    vocab_axis: tuple[str, ...] | None = None
    blocks: LossBlocks = LossBlocks()
    interpret: bool = False


def dtype_check(*, dtype, **_) -> str | None:
    """Why a backend cannot take this dtype, or None (every backend takes the float ones)."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"takes float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    return None
