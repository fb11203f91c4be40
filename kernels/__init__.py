"""Pallas kernels for the hot operations, each beside the jnp reference that specifies it.

Installed as ``mlsys_jax.kernels``; imports nothing from the layers above it.
"""

from mlsys_jax.kernels.attention import REGISTRY as ATTENTION_BACKENDS, flash_attention
from mlsys_jax.kernels.autotune import autotune
from mlsys_jax.kernels.configs import AttentionBlocks, LossBlocks, NormBlocks, default_blocks
from mlsys_jax.kernels.dispatch import KernelUnavailable

__all__ = [
    "ATTENTION_BACKENDS", "AttentionBlocks", "KernelUnavailable", "LossBlocks", "NormBlocks",
    "autotune", "default_blocks", "flash_attention",
]
