"""Our Llama written as a user would in Flax: an ``nnx.Module`` whose weights name our logical
axes, the same block in Linen (used through flax's NNX bridge), and the map from the pure model's
parameters to this one's, so both can start from the same weights.

    h_0 = E[tokens],   a = h + Attn(RMSNorm(h)),   h' = a + W_down(silu(W_gate x) * W_up x), x = RMSNorm(a),
    logits = RMSNorm(h_L) W_head
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from mlsys_jax.kernels.attention import flash_attention
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.flax_modules import from_linen
from mlsys_jax.models.layers import apply_rope, rope_angles

FAN_IN = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class FlaxLlamaConfig:
    vocab_size: int = 384
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 16
    d_ff: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"
    remat: str = "none"

    @classmethod
    def like(cls, cfg: LlamaConfig) -> FlaxLlamaConfig:
        """The sizes and compute dtype of one of our Llama configs."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def attend(cfg: FlaxLlamaConfig, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """Causal grouped-query attention with RoPE on q and k."""
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    return flash_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, causal=True, implementation="xla")


def _part(init: Any, *axes: str) -> Any:
    return nnx.with_partitioning(init, axes)


class Block(nnx.Module):
    """One layer: attention then SwiGLU, each on the RMSNorm of the residual stream."""

    def __init__(self, cfg: FlaxLlamaConfig, rngs: nnx.Rngs) -> None:
        d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        self.cfg = cfg

        def proj(n_in: Any, n_out: Any, *axes: str, axis: Any = -1) -> nnx.LinearGeneral:
            return nnx.LinearGeneral(
                n_in, n_out, axis=axis, use_bias=False, kernel_init=_part(FAN_IN, *axes), rngs=rngs
            )

        self.attn_norm = rms_norm(cfg, rngs)
        self.wq = proj(d, (h, hd), "embed", "heads", "head_dim")
        self.wk = proj(d, (k, hd), "embed", "kv_heads", "head_dim")
        self.wv = proj(d, (k, hd), "embed", "kv_heads", "head_dim")
        self.wo = proj((h, hd), d, "heads", "head_dim", "embed", axis=(-2, -1))
        self.mlp_norm = rms_norm(cfg, rngs)
        self.w_gate = proj(d, f, "embed", "mlp")
        self.w_up = proj(d, f, "embed", "mlp")
        self.w_down = proj(f, d, "mlp", "embed")

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        y = self.attn_norm(x)
        x = x + self.wo(attend(self.cfg, self.wq(y), self.wk(y), self.wv(y), positions))
        y = self.mlp_norm(x)
        return x + self.w_down(jax.nn.silu(self.w_gate(y)) * self.w_up(y))


def rms_norm(cfg: FlaxLlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, scale_init=_part(nnx.initializers.ones, "embed"), rngs=rngs)


class LinenBlock(nn.Module):
    """The same layer in Linen, its parameters at the same paths as ``Block``'s."""

    cfg: FlaxLlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.cfg

        def proj(features: Any, *axes: str, name: str, axis: Any = -1) -> nn.DenseGeneral:
            init = nn.with_logical_partitioning(FAN_IN, axes)
            return nn.DenseGeneral(features, axis=axis, use_bias=False, kernel_init=init, name=name)

        def norm(name: str) -> nn.RMSNorm:
            return nn.RMSNorm(
                cfg.norm_eps, scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), name=name
            )

        heads, kv = (cfg.n_heads, cfg.head_dim), (cfg.n_kv_heads, cfg.head_dim)
        y = norm("attn_norm")(x)
        q = proj(heads, "embed", "heads", "head_dim", name="wq")(y)
        k = proj(kv, "embed", "kv_heads", "head_dim", name="wk")(y)
        v = proj(kv, "embed", "kv_heads", "head_dim", name="wv")(y)
        x = x + proj(cfg.d_model, "heads", "head_dim", "embed", name="wo", axis=(-2, -1))(
            attend(cfg, q, k, v, positions)
        )
        y = norm("mlp_norm")(x)
        gate = proj(cfg.d_ff, "embed", "mlp", name="w_gate")(y)
        up = proj(cfg.d_ff, "embed", "mlp", name="w_up")(y)
        return x + proj(cfg.d_model, "mlp", "embed", name="w_down")(jax.nn.silu(gate) * up)


class FlaxLlama(nnx.Module):
    """The decoder: ``embed``, the blocks in ``layers``, ``head``. ``blocks`` picks how the
    layers are built: ``"nnx"`` (a list of ``Block``), ``"linen"`` (a list of ``LinenBlock``
    through the bridge) or ``"vmap"`` (one ``Block`` built stacked with ``nnx.vmap``)."""

    def __init__(self, cfg: FlaxLlamaConfig, rngs: nnx.Rngs, blocks: str = "nnx") -> None:
        self.tok_embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=_part(nnx.initializers.normal(1.0), "vocab", "embed"), rngs=rngs
        )
        if blocks == "vmap":

            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs)

            self.layers = stacked(rngs)
        elif blocks == "linen":
            x, positions = jnp.zeros((1, 1, cfg.d_model)), jnp.zeros((1,), jnp.int32)
            self.layers = nnx.List([from_linen(LinenBlock(cfg), x, positions, rngs=rngs) for _ in range(cfg.n_layers)])
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = rms_norm(cfg, rngs)
        self.lm_head = nnx.LinearGeneral(
            cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=_part(FAN_IN, "embed", "vocab"), rngs=rngs
        )

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        return self.tok_embed(tokens)

    def head(self, x: jax.Array) -> jax.Array:
        return self.lm_head(self.final_norm(x))


def params_from_llama(params: dict[str, Any]) -> dict[str, Any]:
    """Our pure Llama's parameters (``llama.param_specs`` tree, layers stacked) as the adapted
    ``FlaxLlama``'s: the same arrays under flax's names."""
    leaf = {"attn_norm": "scale", "mlp_norm": "scale"}
    return {
        "tok_embed": {"embedding": params["embed"]},
        "layers": {name: {leaf.get(name, "kernel"): w} for name, w in params["layers"].items()},
        "final_norm": {"scale": params["final_norm"]},
        "lm_head": {"kernel": params["head"]},
    }
