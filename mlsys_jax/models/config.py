"""Llama-family decoder configurations, from the test-sized ``tiny`` to the planning-sized ``70b``."""

from __future__ import annotations

import dataclasses
from typing import Any

from mlsys_jax.models.base import REMAT_POLICIES, ConfigError

# "xla": plain jnp that XLA partitions itself; "pallas": the best Pallas kernel for the platform
# (interpreted on CPU); a backend's name runs that backend; "auto"/"fused": the kernels' own choice.
ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "pallas_triton", "pallas_tpu", "auto")
NORM_IMPLS = ("xla", "pallas", "pallas_triton", "pallas_tpu")
PAGED_ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_triton", "pallas_tpu")
LOSS_IMPLS = ("xla", "fused", "chunked", "pallas_triton", "pallas_tpu")
# Tensor-parallel projections: "xla" einsums XLA partitions; "collective" ppermute rings that
# overlap the token all-gather / reduce-scatter with the matmuls (models.tensor_parallel).
TP_MATMULS = ("xla", "collective")
ROPE_SCALINGS = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Stretched rotary frequencies for contexts longer than pretraining's.

    ``llama3``: frequencies whose wavelength exceeds ``original_max_position / low_freq_factor``
    are divided by ``factor``, those shorter than ``original_max_position / high_freq_factor``
    kept, and those between blended smoothly. ``linear``: every frequency divided by ``factor``.
    """

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError(f"rope scaling kind {self.kind!r} is not one of {ROPE_SCALINGS}")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and choices of a decoder-only transformer with RMSNorm, RoPE, SwiGLU and GQA."""

    vocab_size: int = 384
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 16  # the smallest every attention kernel tiles (Triton's dot)
    d_ff: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # attend to the last w positions only (Mistral)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    max_position: int | None = None  # the longest context the model is made for (None: unstated)
    dtype: str = "bfloat16"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | save_dots
    attention_impl: str = "xla"  # see ATTENTION_IMPLS
    norm_impl: str = "xla"  # see NORM_IMPLS
    loss_impl: str = "xla"  # xla (whole logits) or a fused linear cross-entropy (LOSS_IMPLS)
    paged_attention_impl: str = "auto"  # serving's attention over the KV pages (PAGED_ATTENTION_IMPLS)
    tp_matmul: str = "xla"  # tensor-parallel projections: einsums or collective matmuls (TP_MATMULS)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query "
                "attention shares each K/V head among a whole group of query heads). Fix: pick "
                f"n_kv_heads from the divisors of {self.n_heads}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if isinstance(self.rope_scaling, dict):  # as recorded beside a checkpoint
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("sliding_window", "max_position"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive or None, got {getattr(self, name)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        for name, allowed in (
            ("attention_impl", ATTENTION_IMPLS),
            ("norm_impl", NORM_IMPLS),
            ("loss_impl", LOSS_IMPLS),
            ("paged_attention_impl", PAGED_ATTENTION_IMPLS),
            ("tp_matmul", TP_MATMULS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, LlamaConfig] = {
    # Test-sized: compiles in seconds, shards over up to 8 devices on every axis but kv_heads.
    "tiny": LlamaConfig(),
    # The pipeline test config: tiny with 8 layers, two per stage at pipeline=4 (one per chunk
    # interleaved with 2 virtual stages).
    "tiny8": LlamaConfig(n_layers=8),
    # The CPU demo: about 1M parameters, trains visibly in a few minutes on simulated devices.
    "small": LlamaConfig(
        vocab_size=384,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=512,
    ),
    # Planning sizes (published Llama-family shapes).
    "125m": LlamaConfig(
        vocab_size=32_000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        head_dim=64,
        d_ff=2048,
        tie_embeddings=True,
    ),
    "1b": LlamaConfig(
        vocab_size=128_256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500_000.0,
        tie_embeddings=True,
    ),
    "7b": LlamaConfig(
        vocab_size=32_000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11_008,
    ),
    "8b": LlamaConfig(
        vocab_size=128_256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14_336,
        rope_theta=500_000.0,
    ),
    "70b": LlamaConfig(
        vocab_size=128_256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        d_ff=28_672,
        rope_theta=500_000.0,
    ),
}
