"""Tune each kernel's block sizes for given inputs on this device, forward and backward together.

``tune_flash_attention(q, k, v, causal=True)`` and its siblings time a platform's candidate
configs with ``autotune`` and cache the winner under the same key the kernel reads when called
with ``blocks=None``; afterwards every call of that shape class uses it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.kernels import attention, cross_entropy, norms
from mlsys_jax.kernels.autotune import Trial, autotune
from mlsys_jax.kernels.configs import AttentionBlocks, LossBlocks, NormBlocks
from mlsys_jax.kernels.dispatch import current_platform


def attention_candidates(platform: str | None = None) -> list[AttentionBlocks]:
    platform = platform or current_platform()
    if platform == "tpu":
        sizes, warps, stages = (256, 512, 1024), (4,), (2,)
    elif platform == "gpu":
        sizes, warps, stages = (64, 128), (4, 8), (2, 3)
    else:  # interpreted: only to exercise the machinery
        sizes, warps, stages = (16, 32), (4,), (2,)
    return [AttentionBlocks(bq, bk, bq // 2 if platform == "gpu" else bq, bk // 2 if platform == "gpu" else bk, w, st)
            for bq, bk, w, st in itertools.product(sizes, sizes, warps, stages)]


def norm_candidates(platform: str | None = None) -> list[NormBlocks]:
    platform = platform or current_platform()
    rows = {"tpu": (64, 128, 256), "gpu": (1, 2, 4, 8, 16)}.get(platform, (8, 16))
    warps = (4, 8, 16) if platform == "gpu" else (4,)
    return [NormBlocks(r, w) for r, w in itertools.product(rows, warps)]


def loss_candidates(platform: str | None = None) -> list[LossBlocks]:
    platform = platform or current_platform()
    if platform == "tpu":
        pairs = [(128, 512), (256, 1024), (512, 2048)]
    elif platform == "gpu":
        pairs = [(32, 128), (64, 128), (64, 256), (128, 128), (128, 256)]
    else:
        pairs = [(16, 128), (32, 256)]
    return [LossBlocks(t, v) for t, v in pairs]


def _fwd_bwd(fn: Callable[..., jax.Array], args: tuple, argnums: tuple[int, ...]) -> Callable[[], Any]:
    step = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=argnums))
    return lambda: step(*args)


def tune_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                         implementation: str | None = None, candidates: Sequence[AttentionBlocks] | None = None,
                         path: Path | None = None) -> tuple[AttentionBlocks, list[Trial]]:
    """The fastest forward+backward block config for these inputs, cached for later calls."""
    backend = attention.choose(q, k, causal=causal, implementation=implementation).backend.name
    def run(blocks):
        return _fwd_bwd(lambda q, k, v: attention.flash_attention(
            q, k, v, causal=causal, implementation=backend, blocks=blocks), (q, k, v), (0, 1, 2))
    return autotune("flash_attention", backend, run, candidates or attention_candidates(), q, k, path=path)


def tune_rms_norm(x: jax.Array, weight: jax.Array, *, implementation: str | None = None,
                  candidates: Sequence[NormBlocks] | None = None, path: Path | None = None
                  ) -> tuple[NormBlocks, list[Trial]]:
    backend = norms.choose("rms_norm", x, implementation).backend.name
    def run(blocks):
        return _fwd_bwd(lambda x, w: norms.rms_norm(x, w, implementation=backend, blocks=blocks),
                        (x, weight), (0, 1))
    return autotune("rms_norm", backend, run, candidates or norm_candidates(), x, path=path)


def tune_linear_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *,
                              implementation: str | None = None,
                              candidates: Sequence[LossBlocks] | None = None, path: Path | None = None
                              ) -> tuple[LossBlocks, list[Trial]]:
    backend = cross_entropy.choose(hidden, weight, implementation=implementation).backend.name
    def run(blocks):
        return _fwd_bwd(lambda h, w: cross_entropy.linear_cross_entropy(
            h, w, labels, implementation=backend, blocks=blocks), (hidden, weight), (0, 1))
    return autotune("linear_cross_entropy", backend, run, candidates or loss_candidates(), hidden, weight,
                    path=path)
