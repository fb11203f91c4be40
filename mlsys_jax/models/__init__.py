"""The graph layer: the model interface (``base``), model families that name logical axes only,
and the registry that finds a family and preset by name (``llama:7b``)."""

from mlsys_jax.models import hf, llama, registry
from mlsys_jax.models.base import (
    UNPLACED,
    ConfigError,
    LanguageModel,
    Layout,
    LogicalAxes,
    decode_step,
    forward,
    init_cache,
    loss_sums,
    prefill,
    run_layers,
)
from mlsys_jax.models.config import CONFIGS, LlamaConfig
from mlsys_jax.models.registry import (
    Family,
    build_model,
    canonical_name,
    families,
    get_config,
    register_family,
)

registry.register_family(llama.FAMILY)
registry.register_family(hf.FAMILY)

__all__ = [
    "CONFIGS",
    "UNPLACED",
    "ConfigError",
    "Family",
    "LanguageModel",
    "Layout",
    "LlamaConfig",
    "LogicalAxes",
    "build_model",
    "canonical_name",
    "decode_step",
    "families",
    "forward",
    "get_config",
    "hf",
    "init_cache",
    "llama",
    "loss_sums",
    "prefill",
    "register_family",
    "registry",
    "run_layers",
]
