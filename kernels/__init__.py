"""Pallas kernels for the hot operations, each beside the jnp reference that specifies it.

``flash_attention``, ``rms_norm``/``layer_norm`` and ``linear_cross_entropy`` each dispatch among
backends (``xla``, ``pallas_triton``, ``pallas_tpu``, ``cudnn``, ``chunked``) and explain their
choice; ``sharding`` runs them per shard under a mesh. Installed as ``mlsys_jax.kernels``;
imports nothing from the layers above it.
"""

# Triton first: on CPU, "pallas" means its interpreter, the faster of the two.
from mlsys_jax.kernels import attention_triton as _attention_triton  # noqa: F401  (registers pallas_triton)
from mlsys_jax.kernels import attention_tpu as _attention_tpu  # noqa: F401  (registers pallas_tpu)
from mlsys_jax.kernels.attention import REGISTRY as ATTENTION_BACKENDS, flash_attention
from mlsys_jax.kernels.autotune import autotune
from mlsys_jax.kernels.configs import AttentionBlocks, LossBlocks, NormBlocks, default_blocks
from mlsys_jax.kernels.cross_entropy import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from mlsys_jax.kernels.dispatch import KernelUnavailable
from mlsys_jax.kernels.norms import LAYER_NORM, RMS_NORM, layer_norm, rms_norm

__all__ = [
    "ATTENTION_BACKENDS", "AttentionBlocks", "KernelUnavailable", "LAYER_NORM", "LINEAR_CROSS_ENTROPY",
    "LossBlocks", "NormBlocks", "RMS_NORM", "autotune", "default_blocks", "flash_attention",
    "layer_norm", "linear_cross_entropy", "rms_norm",
]
