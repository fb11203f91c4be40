"""What every kernel's block config shares: positive integer fields, and defaults per device kind.

Each kernel family defines its config (``AttentionBlocks``, ``NormBlocks``, ``LossBlocks``) and
each backend keeps its own defaults beside its kernels, as a table from a device-kind substring
(``"H100"``, ``"TPU"``, ``"cpu"`` for interpreted runs, ``"*"`` for any device) to a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

ANY_DEVICE = "*"


def check_positive(config: object) -> None:
    """Refuse a config whose fields are not all positive ints, naming the field."""
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{field.name} must be a positive int, got {value!r}")


def device_kind() -> str:
    """The default device's kind, e.g. 'NVIDIA H200', 'TPU v5p', 'cpu'."""
    return jax.devices()[0].device_kind


def default_for(table: Mapping[str, Any], kind: type | None, device: str | None = None) -> Any:
    """The entry of ``table`` whose key is a substring of the device kind (first match wins),
    else its ``"*"`` entry, else ``kind()`` (None when there is no config type)."""
    device = (device or device_kind()).lower()
    for key, blocks in table.items():
        if key != ANY_DEVICE and key.lower() in device:
            return blocks
    if ANY_DEVICE in table:
        return table[ANY_DEVICE]
    return kind() if kind is not None else None
