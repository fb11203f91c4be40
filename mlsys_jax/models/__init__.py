"""Pure-function models that name logical axes and know nothing of meshes."""

from mlsys_jax.models import llama
from mlsys_jax.models.config import CONFIGS, ConfigError, LlamaConfig, get_config

__all__ = ["llama", "CONFIGS", "ConfigError", "LlamaConfig", "get_config"]
