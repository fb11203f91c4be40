"""The Flax NNX Llama of ``tests/flax_llama.py`` as a model family, ``nnx_llama``: importing this
file (e.g. through ``$MLSYS_JAX_PLUGINS``) registers it; the model file itself stays plain Flax."""

from __future__ import annotations

import sys
from pathlib import Path

from mlsys_jax.models.flax_modules import flax_family
from mlsys_jax.models.registry import register_family

TESTS = str(Path(__file__).resolve().parent.parent)
if TESTS not in sys.path:  # flax_llama.py sits beside this folder, not in an installed package
    sys.path.append(TESTS)

from flax_llama import FlaxLlama, FlaxLlamaConfig

PRESETS = {
    "tiny": FlaxLlamaConfig(),
    "small": FlaxLlamaConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=512),
}

FAMILY = register_family(flax_family("nnx_llama", FlaxLlama, PRESETS), replace=True)
