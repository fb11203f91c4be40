"""Tune each kernel's block sizes for given inputs on this device, forward and backward together.

``tune_flash_attention(q, k, v, causal=True)`` and its siblings time the chosen backend's own
candidate configs (``Backend.candidates``, kept beside its kernels) with ``autotune`` and cache
the winner under the same key the kernel reads when called with ``blocks=None``; afterwards
every call of that shape class uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels import attention, cross_entropy, norms
from mlsys_jax.kernels.attention import AttentionBlocks
from mlsys_jax.kernels.autotune import Trial, autotune
from mlsys_jax.kernels.cross_entropy import LossBlocks
from mlsys_jax.kernels.dispatch import Backend, current_platform
from mlsys_jax.kernels.norms import NormBlocks


def candidates_of(backend: Backend, platform: str | None = None) -> list[Any]:
    """The configs autotuning tries for a backend on a platform (here by default)."""
    if backend.candidates is None:
        raise ValueError(f"backend {backend.name!r} has no block sizes to tune")
    return list(backend.candidates(platform or current_platform()))


def _fwd_bwd(fn: Callable[..., jax.Array], args: tuple, argnums: tuple[int, ...]) -> Callable[[], Any]:
    step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=argnums))
    return lambda: step(*args)


def tune_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    implementation: str | None = None,
    candidates: Sequence[AttentionBlocks] | None = None,
    path: Path | None = None,
) -> tuple[AttentionBlocks, list[Trial]]:
    """The fastest forward+backward block config for these inputs, cached for later calls."""
    backend = attention.choose(q, k, causal=causal, implementation=implementation).backend

    def run(blocks):
        return _fwd_bwd(
            lambda q, k, v: attention.flash_attention(
                q, k, v, causal=causal, implementation=backend.name, blocks=blocks
            ),
            (q, k, v),
            (0, 1, 2),
        )

    return autotune("flash_attention", backend.name, run, candidates or candidates_of(backend), q, k, path=path)


def tune_rms_norm(
    x: jax.Array,
    weight: jax.Array,
    *,
    implementation: str | None = None,
    candidates: Sequence[NormBlocks] | None = None,
    path: Path | None = None,
) -> tuple[NormBlocks, list[Trial]]:
    backend = norms.choose("rms_norm", x, implementation).backend

    def run(blocks):
        return _fwd_bwd(
            lambda x, w: norms.rms_norm(x, w, implementation=backend.name, blocks=blocks), (x, weight), (0, 1)
        )

    return autotune("rms_norm", backend.name, run, candidates or candidates_of(backend), x, path=path)


def tune_linear_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    implementation: str | None = None,
    candidates: Sequence[LossBlocks] | None = None,
    path: Path | None = None,
) -> tuple[LossBlocks, list[Trial]]:
    backend = cross_entropy.choose(hidden, weight, implementation=implementation).backend

    def run(blocks):
        return _fwd_bwd(
            lambda h, w: cross_entropy.linear_cross_entropy(h, w, labels, implementation=backend.name, blocks=blocks),
            (hidden, weight),
            (0, 1),
        )

    return autotune(
        "linear_cross_entropy", backend.name, run, candidates or candidates_of(backend), hidden, weight, path=path
    )
