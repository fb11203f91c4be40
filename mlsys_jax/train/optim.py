"""AdamW with linear warmup, cosine decay and global-norm clipping, built from optax."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from mlsys_jax.params import ParamSpec, is_spec, specs_key


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its schedule: peak ``lr`` after ``warmup_steps``, cosine to
    ``lr * min_lr_ratio`` at ``total_steps``."""

    lr: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 300
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"need total_steps >= 1 and warmup_steps >= 0, got {self.total_steps} and {self.warmup_steps}"
            )


def schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(specs: Any) -> Any:
    """Decay matrices only: a parameter with fewer than two dims besides ``layers`` (norm
    scales, biases) is left alone."""

    def is_matrix(s: ParamSpec) -> bool:
        return sum(1 for a in s.logical_axes if a != "layers") >= 2

    return jax.tree_util.tree_map(is_matrix, specs, is_leaf=is_spec)


#: Optimizers built, by (config, spec tree): the same settings give the same object, so figures
#: computed from one (its state's bytes under a plan) can be cached by it.
_BUILT: dict[tuple[Any, ...], optax.GradientTransformation] = {}


def adamw(cfg: OptimConfig, specs: Any) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the schedule (decay masked to matrices)."""
    key = (cfg, specs_key(specs))
    if key not in _BUILT:
        if len(_BUILT) >= 64:
            _BUILT.clear()
        _BUILT[key] = _adamw(cfg, specs)
    return _BUILT[key]


def _adamw(cfg: OptimConfig, specs: Any) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(specs),
        ),
    )
