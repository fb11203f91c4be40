"""``rms_norm`` and ``layer_norm``: the jnp references, and dispatch over fused Pallas backends.

Both normalize over the last axis in fp32 and return x's dtype; weight (and bias) have shape (D,)
and their gradients are summed over every row in fp32, then cast to the parameter's dtype. The
``xla`` backend is the reference differentiated by JAX; the Pallas backends (kernels in
``norms_pallas``) save the fp32 row statistics in the forward and reuse them in a ``custom_vjp``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mlsys_jax.kernels import norms_pallas
from mlsys_jax.kernels.autotune import resolve_blocks
from mlsys_jax.kernels.configs import NormBlocks
from mlsys_jax.kernels.dispatch import Backend, Choice, Registry
from mlsys_jax.kernels.norms_pallas import TPU, TRITON, NormKernelOptions

__all__ = ["rms_norm", "layer_norm", "rms_norm_reference", "layer_norm_reference", "RMS_NORM",
           "LAYER_NORM", "choose"]

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Whole feature rows live in one Triton tile; past this the tile no longer fits on chip.
TRITON_MAX_FEATURES = 65536

_ORDER = {"gpu": ("pallas_triton", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)}
RMS_NORM = Registry("rms_norm", _ORDER)
LAYER_NORM = Registry("layer_norm", _ORDER)


# --- the references -------------------------------------------------------------------------------

def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis, in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm_reference(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-5
                         ) -> jax.Array:
    """(x - mean) * rsqrt(var + eps) * weight + bias over the last axis, in fp32, in x's dtype."""
    x32 = x.astype(jnp.float32)
    xc = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# --- the Pallas backends --------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_norm(x, weight, bias, opts: NormKernelOptions):
    return norms_pallas.norm_forward(x, weight, bias, opts)[0]


def _fused_norm_fwd(x, weight, bias, opts):
    y, mean, rstd = norms_pallas.norm_forward(x, weight, bias, opts)
    return y, (x, weight, bias, mean, rstd)


def _fused_norm_bwd(opts, res, dy):
    x, weight, bias, mean, rstd = res
    dx, dw, db = norms_pallas.norm_backward(x, weight, mean, rstd, dy, opts)
    return dx, dw.astype(weight.dtype), None if bias is None else db.astype(bias.dtype)


_fused_norm.defvjp(_fused_norm_fwd, _fused_norm_bwd)


def _pallas_run(norm: str, lowering: str) -> Callable[..., jax.Array]:
    def run(x, weight, bias, *, eps: float, blocks: NormBlocks, interpret: bool = False):
        norms_pallas.check_blocks(blocks, lowering)
        opts = NormKernelOptions(norm=norm, eps=float(eps), blocks=blocks, lowering=lowering,
                                 interpret=interpret)
        return _fused_norm(x, weight, None if norm == "rms" else bias, opts)
    return run


def _triton_check(*, dtype, features, **_) -> str | None:
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"takes float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if features > TRITON_MAX_FEATURES:
        return f"a feature row of {features} does not fit one tile (at most {TRITON_MAX_FEATURES})"
    return None


def _tpu_check(*, dtype, features, **_) -> str | None:
    if jnp.dtype(dtype) not in TPU_DTYPES:
        return f"takes float32 or bfloat16 on TPU, not {jnp.dtype(dtype).name}"
    if features % 128:
        return f"needs the feature dim to be a multiple of 128 (TPU lanes), got {features}"
    return None


def _xla_rms(x, weight, bias, *, eps, blocks):
    del bias, blocks
    return rms_norm_reference(x, weight, eps)


def _xla_layer(x, weight, bias, *, eps, blocks):
    del blocks
    return layer_norm_reference(x, weight, bias, eps)


for _registry, _norm, _xla in ((RMS_NORM, "rms", _xla_rms), (LAYER_NORM, "layer", _xla_layer)):
    _registry.register(Backend("xla", ("cpu", "gpu", "tpu"), _xla))
    _registry.register(Backend("pallas_triton", ("gpu",), _pallas_run(_norm, TRITON), _triton_check,
                               interpretable=True))
    _registry.register(Backend("pallas_tpu", ("tpu",), _pallas_run(_norm, TPU), _tpu_check,
                               interpretable=True))


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


def choose(op: str, x: jax.Array, implementation: str | None = None) -> Choice:
    """The backend ``rms_norm``/``layer_norm`` (``op``) would run for x (see ``Choice.describe``)."""
    registry = {"rms_norm": RMS_NORM, "layer_norm": LAYER_NORM}.get(op)
    if registry is None:
        raise ValueError(f"choose: op must be 'rms_norm' or 'layer_norm', got {op!r}")
    return registry.choose(implementation, dtype=x.dtype, features=x.shape[-1])


def _apply(op: str, x, weight, bias, eps, implementation, blocks) -> jax.Array:
    choice = choose(op, x, implementation)
    if blocks is None:
        blocks = resolve_blocks(op, choice.backend.name, NormBlocks, x)
    rows = x.reshape(-1, x.shape[-1])
    return choice(rows, weight, bias, eps=eps, blocks=blocks).reshape(x.shape)


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float = 1e-6,
             implementation: str | None = None, blocks: NormBlocks | None = None) -> jax.Array:
    """x * rsqrt(mean(x^2, -1) + eps) * weight in fp32, returned in x's dtype.

    x: (..., D); weight: (D,). ``implementation``: None picks the best backend here, "pallas" the
    best Pallas one, or a name ("xla", "pallas_triton", "pallas_tpu").
    """
    _check_inputs("rms_norm", x, {"weight": weight})
    return _apply("rms_norm", x, weight, None, eps, implementation, blocks)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, *, eps: float = 1e-5,
               implementation: str | None = None, blocks: NormBlocks | None = None) -> jax.Array:
    """(x - mean) * rsqrt(var + eps) * weight + bias over the last axis in fp32, in x's dtype.

    x: (..., D); weight, bias: (D,). ``implementation`` as in ``rms_norm``.
    """
    _check_inputs("layer_norm", x, {"weight": weight, "bias": bias})
    return _apply("layer_norm", x, weight, bias, eps, implementation, blocks)

