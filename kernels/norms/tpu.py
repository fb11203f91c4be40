"""The fused norms on the TPU (Mosaic) lowering: backend ``pallas_tpu`` (interpreted on CPU)."""

from __future__ import annotations

import jax.numpy as jnp

from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.norms.kernel import TPU, pallas_run
from mlsys_jax.kernels.norms.options import NormBlocks

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

#: Default rows per block per device kind; "cpu" is the TPU interpreter.
DEFAULTS = {"TPU": NormBlocks(block_rows=256), "cpu": NormBlocks(block_rows=32)}


def check(*, dtype, features, **_) -> str | None:
    """Why the TPU norm kernels cannot serve these arguments, or None."""
    if jnp.dtype(dtype) not in DTYPES:
        return f"takes float32 or bfloat16 on TPU, not {jnp.dtype(dtype).name}"
    if features % 128:
        return f"needs the feature dim to be a multiple of 128 (TPU lanes), got {features}"
    return None


def candidates(platform: str) -> list[NormBlocks]:
    """Rows per block autotuning tries: 64-256 on a TPU, two sizes interpreted."""
    return [NormBlocks(r) for r in ((64, 128, 256) if platform == "tpu" else (8, 16))]


def backend(norm: str) -> Backend:
    """The ``pallas_tpu`` entry of the ``rms`` or ``layer`` norm's table."""
    return Backend(
        "pallas_tpu",
        ("tpu",),
        pallas_run(norm, TPU),
        check,
        interpretable=True,
        blocks=NormBlocks,
        defaults=DEFAULTS,
        candidates=candidates,
    )
