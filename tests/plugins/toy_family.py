"""A toy model family that lives in this one file: a residual stack of soft mixtures of MLP
experts, whose weights name an ``experts`` axis that Llama does not have.

    h_0 = E[tokens],   h_l = h_{l-1} + mean_e relu(h_{l-1} W_in[e]) W_out[e],   logits = h_L E^T

Importing the module registers the family as ``toy``; nothing else in the toolkit knows it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mlsys_jax.models import kernel_ops
from mlsys_jax.models.base import LanguageModel, Layout, LogicalAxes
from mlsys_jax.models.registry import Family, register_family
from mlsys_jax.params import ParamSpec, fan_in, normal


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 384
    d_model: int = 32
    n_layers: int = 2
    n_experts: int = 4
    d_expert: int = 64
    dtype: str = "float32"
    remat: str = "none"


PRESETS = {"small": ToyConfig(), "wide": ToyConfig(d_model=64, n_experts=8, d_expert=128)}
AXES = LogicalAxes(
    params=("vocab", "embed", "experts", "expert_mlp", "layers"),
    activations=("batch", "seq", "embed", "experts", "vocab", "layers"),
)


def param_specs(cfg: ToyConfig) -> dict:
    d, e, f, v = cfg.d_model, cfg.n_experts, cfg.d_expert, cfg.vocab_size
    layer = {
        "w_in": ParamSpec((e, d, f), ("experts", "embed", "expert_mlp"), fan_in(1)),
        "w_out": ParamSpec((e, f, d), ("experts", "expert_mlp", "embed"), fan_in(1, 0.5)),
    }
    return {
        "embed": ParamSpec((v, d), ("vocab", "embed"), normal(d**-0.5)),
        "layers": {k: s.stacked(cfg.n_layers) for k, s in layer.items()},
    }


def embed(cfg, params, tokens, positions, layout: Layout):
    del positions
    return layout.constrain(params["embed"].astype(cfg.dtype)[tokens], ("batch", "seq", "embed"))


def block(cfg, w, x, positions, cache, layout: Layout):
    del positions
    hidden = jax.nn.relu(jnp.einsum("bsd,edf->bsef", x, w["w_in"].astype(x.dtype)))
    out = jnp.einsum("bsef,efd->bsd", hidden, w["w_out"].astype(x.dtype)) / cfg.n_experts
    return layout.constrain(x + out, ("batch", "seq", "embed")), cache


def head(cfg, params, x, layout: Layout):
    return kernel_ops.logits(x, params["embed"].T.astype(x.dtype), layout)


def loss(cfg, params, x, targets, mask, layout: Layout):
    return kernel_ops.next_token_loss(x, params["embed"].T.astype(x.dtype), targets, mask, "xla", layout)


def language_model(cfg: ToyConfig, name: str = "toy") -> LanguageModel:
    bind = functools.partial
    matmuls = cfg.n_layers * 2 * cfg.n_experts * cfg.d_model * cfg.d_expert + cfg.d_model * cfg.vocab_size
    return LanguageModel(
        name=name,
        specs=param_specs(cfg),
        embed=bind(embed, cfg),
        block=bind(block, cfg),
        head=bind(head, cfg),
        loss=bind(loss, cfg),
        cache_specs=lambda batch, max_len: {},
        flops_per_token=lambda seq: 6.0 * matmuls,
        vocab_size=cfg.vocab_size,
        num_layers=cfg.n_layers,
        axes=AXES,
        config=cfg,
        compute_dtype=jnp.dtype(cfg.dtype),
        remat=cfg.remat,
    )


FAMILY = register_family(Family("toy", ToyConfig, PRESETS, AXES, language_model), replace=True)
