"""Varying-manual-axes bookkeeping for kernels inside ``jax.shard_map(check_vma=True)``.

Inside a checked shard_map every value's type says which mesh axes it varies over. A custom
backward rule must hand back cotangents of its primals' types, and a Pallas call's outputs must
say how they vary: these helpers read, widen and sum those types; outside shard_map (or without
checking) every value varies over nothing and they do nothing.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def varying_axes(x: Any) -> frozenset:
    """The mesh axes ``x`` varies over inside shard_map (jax 0.10 keeps them in ``aval.mat``,
    older releases in ``aval.vma``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def out_shape(shape: tuple[int, ...], dtype: Any, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An output shape that varies over the same mesh axes as ``like`` (which shard_map's
    check_vma asks of every pallas_call output)."""
    aval = jax.typeof(like)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        try:
            return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
        except TypeError:
            pass
    vma = getattr(aval, "vma", None)
    if vma is not None:
        try:
            # vma=: the keyword of older JAX, which current JAX no longer declares.
            return jax.ShapeDtypeStruct(shape, dtype, vma=vma)  # pyright: ignore[reportCallIssue]
        except TypeError:
            pass
    return jax.ShapeDtypeStruct(shape, dtype)


def vary_like(x: jax.Array, *like: Any) -> jax.Array:
    """``x`` marked as varying over every mesh axis any of ``like`` varies over (a no-op outside
    shard_map), so loop carries and kernel operands have one consistent type."""
    axes = frozenset().union(*(varying_axes(a) for a in like)) - varying_axes(x)
    if not axes:
        return x
    pcast = getattr(lax, "pcast", None)
    if pcast is not None:
        return pcast(x, tuple(sorted(axes)), to="varying")
    # pvary: older JAX's name for pcast(..., to="varying"), which current JAX no longer declares.
    return lax.pvary(x, tuple(sorted(axes)))  # pyright: ignore[reportAttributeAccessIssue]


def sum_to_vma_of(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the mesh axes its primal is invariant over (e.g. dw of a weight
    replicated over the data axis is the sum of every data shard's dw)."""
    extra = varying_axes(ct) - varying_axes(primal)
    return lax.psum(ct, tuple(sorted(extra))) if extra else ct
