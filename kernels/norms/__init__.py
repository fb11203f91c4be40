"""``rms_norm`` and ``layer_norm``: one interface over the norm backends, with checks and dispatch.

Both normalize over the last axis in fp32 and return x's dtype; weight (and bias) have shape (D,)
and their gradients are summed over every row in fp32, then cast to the parameter's dtype. The
family's layout: ``reference`` (the specification and the ``xla`` backends), ``kernel`` (one
Pallas kernel body for both lowerings, saving the fp32 row statistics for a ``custom_vjp``),
``triton`` and ``tpu`` (each backend's checks, block defaults and tuning candidates), and
``options``. ``RMS_NORM`` and ``LAYER_NORM`` are the explicit backend tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.autotune import resolve_blocks
from mlsys_jax.kernels.dispatch import Choice, Registry
from mlsys_jax.kernels.norms import reference, tpu, triton
from mlsys_jax.kernels.norms.options import FLOAT_DTYPES, NormBlocks
from mlsys_jax.kernels.norms.reference import layer_norm_reference, rms_norm_reference

__all__ = [
    "LAYER_NORM",
    "RMS_NORM",
    "NormBlocks",
    "choose",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
]

_ORDER = {"gpu": ("pallas_triton", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)}
RMS_NORM = Registry("rms_norm", _ORDER, backends=(reference.RMS_BACKEND, triton.backend("rms"), tpu.backend("rms")))
LAYER_NORM = Registry(
    "layer_norm", _ORDER, backends=(reference.LAYER_BACKEND, triton.backend("layer"), tpu.backend("layer"))
)


# --- the public functions -------------------------------------------------------------------------


def _check_inputs(op: str, x: jax.Array, params: dict[str, jax.Array]) -> None:
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have a feature axis (..., D), got a scalar")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    d = x.shape[-1]
    for name, p in params.items():
        if p.shape != (d,):
            raise ValueError(
                f"{op}: {name} must have shape (D,) = ({d},) to match x's last axis (x is {x.shape}), "
                f"got {p.shape}. Fix: pass one {name} entry per feature of x."
            )
        if not jnp.issubdtype(p.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be a float array, got {p.dtype}")


def choose(op: str, x: jax.Array | jax.ShapeDtypeStruct, implementation: str | None = None) -> Choice:
    """The backend ``rms_norm``/``layer_norm`` (``op``) would run for x (see ``Choice.describe``)."""
    registry = {"rms_norm": RMS_NORM, "layer_norm": LAYER_NORM}.get(op)
    if registry is None:
        raise ValueError(f"choose: op must be 'rms_norm' or 'layer_norm', got {op!r}")
    return registry.choose(implementation, dtype=x.dtype, features=x.shape[-1])


def _apply(op: str, x, weight, bias, eps, implementation, blocks) -> jax.Array:
    choice = choose(op, x, implementation)
    if blocks is None:
        blocks = resolve_blocks(op, choice.backend, x)
    return choice(x, weight, bias, eps=eps, blocks=blocks)


def rms_norm(
    x: jax.Array,
    weight: jax.Array,
    *,
    eps: float = 1e-6,
    implementation: str | None = None,
    blocks: NormBlocks | None = None,
) -> jax.Array:
    """x * rsqrt(mean(x^2, -1) + eps) * weight in fp32, returned in x's dtype.

    x: (..., D); weight: (D,). ``implementation``: None picks the best backend here, "pallas" the
    best Pallas one, or a name ("xla", "pallas_triton", "pallas_tpu").
    """
    _check_inputs("rms_norm", x, {"weight": weight})
    return _apply("rms_norm", x, weight, None, eps, implementation, blocks)


def layer_norm(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array,
    *,
    eps: float = 1e-5,
    implementation: str | None = None,
    blocks: NormBlocks | None = None,
) -> jax.Array:
    """(x - mean) * rsqrt(var + eps) * weight + bias over the last axis in fp32, in x's dtype.

    x: (..., D); weight, bias: (D,). ``implementation`` as in ``rms_norm``.
    """
    _check_inputs("layer_norm", x, {"weight": weight, "bias": bias})
    return _apply("layer_norm", x, weight, bias, eps, implementation, blocks)
