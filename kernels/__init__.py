"""Pallas kernels for the hot operations, each beside the jnp reference that specifies it.

One package per operation family, laid out the same way: ``reference`` (the specification, and
the ``xla`` backend), one module per other backend with its block defaults and tuning candidates,
``options`` for the block config, and the public function in the package itself with an explicit
backend table (``FLASH_ATTENTION``, ``RMS_NORM``/``LAYER_NORM``, ``LINEAR_CROSS_ENTROPY``).
``sharding`` runs the kernels per shard under a mesh. Installed as ``mlsys_jax.kernels``;
imports nothing from the layers above it.
"""

from mlsys_jax.kernels.attention import FLASH_ATTENTION, AttentionBlocks, flash_attention
from mlsys_jax.kernels.autotune import autotune, default_blocks
from mlsys_jax.kernels.cross_entropy import LINEAR_CROSS_ENTROPY, LossBlocks, linear_cross_entropy
from mlsys_jax.kernels.dispatch import KernelUnavailable
from mlsys_jax.kernels.norms import LAYER_NORM, RMS_NORM, NormBlocks, layer_norm, rms_norm

__all__ = [
    "FLASH_ATTENTION",
    "LAYER_NORM",
    "LINEAR_CROSS_ENTROPY",
    "RMS_NORM",
    "AttentionBlocks",
    "KernelUnavailable",
    "LossBlocks",
    "NormBlocks",
    "autotune",
    "default_blocks",
    "flash_attention",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
]
