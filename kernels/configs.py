"""Block sizes of each kernel as small frozen configs, with defaults per device kind.

A kernel takes ``blocks=None`` to mean: the autotuned winner cached for this device, shape class
and dtype if there is one, else the default for the device kind below.
"""

from __future__ import annotations

import dataclasses

import jax


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
        _positive(self)


@dataclasses.dataclass(frozen=True)
class NormBlocks:
    """Rows of the input per program of a fused norm (a whole feature row is one tile)."""

    block_rows: int = 16
    num_warps: int = 4

    def __post_init__(self) -> None:
        _positive(self)


@dataclasses.dataclass(frozen=True)
class LossBlocks:
    """Tokens and vocabulary entries per tile of the fused linear cross-entropy."""

    block_tokens: int = 64
    block_vocab: int = 512
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        _positive(self)


def _positive(config: object) -> None:
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{type(config).__name__}.{field.name} must be a positive int, got {value!r}"
            )


# Defaults per device kind (substring of ``jax.Device.device_kind``, first match wins).
_DEFAULTS: dict[str, dict[type, object]] = {
    "H200": {
        AttentionBlocks: AttentionBlocks(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                                         num_warps=8, num_stages=3),
        NormBlocks: NormBlocks(block_rows=8, num_warps=8),
        LossBlocks: LossBlocks(block_tokens=64, block_vocab=256, num_warps=8, num_stages=3),
    },
    "H100": {
        AttentionBlocks: AttentionBlocks(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                                         num_warps=8, num_stages=3),
        NormBlocks: NormBlocks(block_rows=8, num_warps=8),
        LossBlocks: LossBlocks(block_tokens=64, block_vocab=256, num_warps=8, num_stages=3),
    },
    "A100": {
        AttentionBlocks: AttentionBlocks(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                                         num_warps=4, num_stages=2),
        NormBlocks: NormBlocks(block_rows=4, num_warps=8),
        LossBlocks: LossBlocks(block_tokens=64, block_vocab=128, num_warps=4, num_stages=2),
    },
    "TPU": {
        AttentionBlocks: AttentionBlocks(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256),
        NormBlocks: NormBlocks(block_rows=256),
        LossBlocks: LossBlocks(block_tokens=256, block_vocab=1024),
    },
    # CPU runs Pallas only interpreted, where every block is a loop step: keep blocks few.
    "cpu": {
        AttentionBlocks: AttentionBlocks(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32),
        NormBlocks: NormBlocks(block_rows=32),
        LossBlocks: LossBlocks(block_tokens=32, block_vocab=128),
    },
}


def device_kind() -> str:
    """The default device's kind, e.g. 'NVIDIA H200', 'TPU v5p', 'cpu'."""
    return jax.devices()[0].device_kind


def default_blocks(kind: type, device: str | None = None):
    """The default config of ``kind`` (e.g. ``AttentionBlocks``) for a device kind."""
    device = device or device_kind()
    for key, table in _DEFAULTS.items():
        if key.lower() in device.lower():
            return table[kind]
    return kind()
