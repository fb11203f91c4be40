"""A Pallas attention backend from a forward and a backward kernel, wired as one ``custom_vjp``.

A forward returns the output and the log-sum-exp; the backward recomputes probabilities from
them. Both take ``(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, ...)`` as ``flash_attention``
hands them over (the last four are None when absent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax

from mlsys_jax.kernels.attention.options import AttentionBlocks
from mlsys_jax.kernels.dispatch import Backend

Forward = Callable[..., tuple[jax.Array, jax.Array]]
Backward = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def pallas_vjp(forward: Forward, backward: Backward) -> Callable[..., jax.Array]:
    """A differentiable attention from ``forward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths,
    opts) -> (o, lse)`` and ``backward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, o, lse, do,
    opts) -> (dq, dk, dv)``."""

    def attend(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts) -> jax.Array:
        return forward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts)[0]

    def attend_fwd(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts):
        o, lse = forward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts)
        return o, (q, k, v, q_seg, kv_seg, q_offset, kv_lengths, o, lse)

    def attend_bwd(opts, res, do):
        q, k, v, q_seg, kv_seg, q_offset, kv_lengths, o, lse = res
        dq, dk, dv = backward(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, o, lse, do, opts)
        return dq, dk, dv, None, None, None, None

    differentiable = jax.custom_vjp(attend, nondiff_argnums=(7,))
    differentiable.defvjp(attend_fwd, attend_bwd)
    return differentiable


def pallas_backend(
    name: str,
    platforms: tuple[str, ...],
    forward: Forward,
    backward: Backward,
    check: Callable[..., str | None],
    defaults: Mapping[str, AttentionBlocks],
    candidates: Callable[[str], Sequence[AttentionBlocks]],
) -> Backend:
    """The backend table's entry for a pair of Pallas kernels."""
    attend = pallas_vjp(forward, backward)

    def run(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, opts, *, interpret: bool = False):
        return attend(q, k, v, q_seg, kv_seg, q_offset, kv_lengths, dataclasses.replace(opts, interpret=interpret))

    return Backend(
        name,
        platforms,
        run,
        check,
        interpretable=True,
        blocks=AttentionBlocks,
        defaults=defaults,
        candidates=candidates,
    )
