"""The two Pallas lowerings' parameters, named once across jax versions.

Triton (GPU) takes ``num_warps``/``num_stages``; without them jax sends a GPU Pallas call to
Mosaic GPU instead, so Triton kernels always pass them. Mosaic TPU takes grid dimension
semantics. Interpreting a TPU kernel on CPU uses ``pltpu.InterpretParams`` where it exists.
"""

from __future__ import annotations

from typing import Any

from jax.experimental.pallas import tpu as pltpu

try:  # absent from a jax built without GPU Pallas support
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
    pltriton = None


def triton_params(num_warps: int | None = None, num_stages: int | None = None) -> Any:
    params = (
        None
        if pltriton is None
        else (getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams", None))
    )
    if params is None:  # pragma: no cover
        return None
    return params(num_warps=num_warps, num_stages=num_stages)


def tpu_params(semantics: tuple[str, ...]) -> Any:
    # TPUCompilerParams: the older JAX name, which current JAX no longer declares.
    params = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams  # pyright: ignore[reportAttributeAccessIssue]
    return params(dimension_semantics=semantics)


def tpu_interpret(interpret: bool) -> Any:
    """``pallas_call``'s ``interpret=`` for a TPU kernel: the TPU interpreter when asked for."""
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True
