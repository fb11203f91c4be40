"""The fused norms on the Triton lowering: backend ``pallas_triton`` (GPU; interpreted on CPU)."""

from __future__ import annotations

import jax.numpy as jnp

from mlsys_jax.kernels.dispatch import Backend
from mlsys_jax.kernels.norms.kernel import TRITON, pallas_run
from mlsys_jax.kernels.norms.options import FLOAT_DTYPES, NormBlocks

# Whole feature rows live in one Triton tile; past this the tile no longer fits on chip.
MAX_FEATURES = 65536

#: Default rows per program per device kind; "cpu" is the interpreter (few, large blocks).
DEFAULTS = {
    "H200": NormBlocks(block_rows=8, num_warps=8),
    "H100": NormBlocks(block_rows=8, num_warps=8),
    "A100": NormBlocks(block_rows=4, num_warps=8),
    "cpu": NormBlocks(block_rows=32),
}


def check(*, dtype, features, **_) -> str | None:
    """Why the Triton norm kernels cannot serve these arguments, or None."""
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"takes float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if features > MAX_FEATURES:
        return f"a feature row of {features} does not fit one tile (at most {MAX_FEATURES})"
    return None


def candidates(platform: str) -> list[NormBlocks]:
    """Configs autotuning tries: 1-16 rows and 4-16 warps on a GPU, two sizes interpreted."""
    if platform == "gpu":
        return [NormBlocks(r, w) for r in (1, 2, 4, 8, 16) for w in (4, 8, 16)]
    return [NormBlocks(r) for r in (8, 16)]


def backend(norm: str) -> Backend:
    """The ``pallas_triton`` entry of the ``rms`` or ``layer`` norm's table."""
    return Backend(
        "pallas_triton",
        ("gpu",),
        pallas_run(norm, TRITON),
        check,
        interpretable=True,
        blocks=NormBlocks,
        defaults=DEFAULTS,
        candidates=candidates,
    )
