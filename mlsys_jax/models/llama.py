"""A Llama-family decoder as pure functions: parameter specs, the forward pass, FLOPs per token.

    h_0     = E[tokens]
    a_l     = h_{l-1} + Attn(RMSNorm(h_{l-1}))       (RoPE on q and k, grouped-query heads)
    h_l     = a_l + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(a_l)
    logits  = RMSNorm(h_L) W_head                     (W_head = E^T when embeddings are tied)

Layers are stacked on a leading ``layers`` axis and run with ``lax.scan``, so compile time does
not grow with depth. Weights and activations name logical axes only; a plan maps them to a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.models import kernel_ops
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.layers import (
    Constrain,
    apply_rope,
    embedding_lookup,
    logits_projection,
    no_constraint,
    qkv_projection,
    rope_angles,
    swiglu,
)
from mlsys_jax.params import ParamSpec, fan_in, normal, ones
from mlsys_jax.train.model import LanguageModel

Params = dict[str, Any]


def param_specs(cfg: LlamaConfig) -> Params:
    """The model's weights as a tree of ``ParamSpec`` (shape, dtype, logical axes, initializer)."""
    d, h, k, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    dt = jnp.dtype(cfg.param_dtype)
    out_scale = 1.0 / (2 * cfg.n_layers) ** 0.5  # keep the residual stream's variance flat

    def p(shape, axes, init):
        return ParamSpec(shape, axes, init, dt)

    layer = {
        "attn_norm": p((d,), ("embed",), ones),
        "wq": p((d, h, hd), ("embed", "heads", "head_dim"), fan_in(0)),
        "wk": p((d, k, hd), ("embed", "kv_heads", "head_dim"), fan_in(0)),
        "wv": p((d, k, hd), ("embed", "kv_heads", "head_dim"), fan_in(0)),
        "wo": p((h, hd, d), ("heads", "head_dim", "embed"), fan_in((0, 1), out_scale)),
        "mlp_norm": p((d,), ("embed",), ones),
        "w_gate": p((d, f), ("embed", "mlp"), fan_in(0)),
        "w_up": p((d, f), ("embed", "mlp"), fan_in(0)),
        "w_down": p((f, d), ("mlp", "embed"), fan_in(0, out_scale)),
    }
    specs: Params = {
        # Tied tables double as the output head, so they start at the head's 1/sqrt(d) scale.
        "embed": p((v, d), ("vocab", "embed"), normal(d ** -0.5 if cfg.tie_embeddings else 1.0)),
        "layers": {name: s.stacked(cfg.n_layers) for name, s in layer.items()},
        "final_norm": p((d,), ("embed",), ones),
    }
    if not cfg.tie_embeddings:
        specs["head"] = p((d, v), ("embed", "vocab"), fan_in(0))
    return specs


def _block(cfg: LlamaConfig, constrain: Constrain, cos: jax.Array, sin: jax.Array):
    dt = jnp.dtype(cfg.dtype)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return kernel_ops.attention(q, k, v, cfg.attention_impl, constrain)

    def rms_norm(x: jax.Array, w: jax.Array) -> jax.Array:
        return kernel_ops.norm(x, w, cfg.norm_eps, cfg.norm_impl, constrain)

    def block(x: jax.Array, w: Params) -> tuple[jax.Array, None]:
        w = jax.tree_util.tree_map(lambda a: a.astype(dt), w)
        y = rms_norm(x, w["attn_norm"])
        q, k, v = qkv_projection(y, w["wq"], w["wk"], w["wv"])
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        o = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        o = constrain(o, ("batch", "seq", "heads", "head_dim"))
        x = constrain(x + jnp.einsum("bshk,hkd->bsd", o, w["wo"]), ("batch", "seq", "embed"))
        y = rms_norm(x, w["mlp_norm"])
        x = x + swiglu(y, w["w_gate"], w["w_up"], w["w_down"], constrain)
        return constrain(x, ("batch", "seq", "embed")), None

    if cfg.remat == "full":
        return jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    if cfg.remat == "save_dots":
        return jax.checkpoint(block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return block


def hidden_states(params: Params, tokens: jax.Array, cfg: LlamaConfig,
                  constrain: Constrain = no_constraint) -> jax.Array:
    """The final normalized residual stream, (batch, seq, d_model) in the compute dtype."""
    dt = jnp.dtype(cfg.dtype)
    table = constrain(params["embed"].astype(dt), ("vocab", None))  # whole rows, for the lookup
    x = constrain(embedding_lookup(table, tokens), ("batch", "seq", "embed"))
    cos, sin = rope_angles(jnp.arange(tokens.shape[1]), cfg.head_dim, cfg.rope_theta)
    x, _ = jax.lax.scan(_block(cfg, constrain, cos, sin), x, params["layers"])
    return kernel_ops.norm(x, params["final_norm"].astype(dt), cfg.norm_eps, cfg.norm_impl, constrain)


def _head(params: Params, cfg: LlamaConfig, dtype: Any) -> jax.Array:
    return (params["embed"].T if cfg.tie_embeddings else params["head"]).astype(dtype)


def forward(params: Params, tokens: jax.Array, cfg: LlamaConfig,
            constrain: Constrain = no_constraint) -> jax.Array:
    """Next-token logits in fp32, (batch, seq, vocab), for int tokens of shape (batch, seq)."""
    x = hidden_states(params, tokens, cfg, constrain)
    logits = logits_projection(x, _head(params, cfg, x.dtype))
    return constrain(logits, ("batch", "seq", "vocab"))


def loss_sums(params: Params, tokens: jax.Array, targets: jax.Array, mask: jax.Array, cfg: LlamaConfig,
              constrain: Constrain = no_constraint) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of next-token cross-entropy through the fused loss: the logits of
    ``forward`` are never formed whole."""
    x = hidden_states(params, tokens, cfg, constrain)
    return kernel_ops.next_token_loss(x, _head(params, cfg, x.dtype), targets, mask, cfg.loss_impl, constrain)


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token (all but norms and the embedding lookup)."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    per_layer = d * h * hd * 2 + d * k * hd * 2 + 3 * d * f
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward): 6 N + 12 L H d_head S, as in the
    PaLM paper's MFU accounting (attention counted without the causal halving)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * matmul_params(cfg) + attention


def language_model(cfg: LlamaConfig, name: str = "llama") -> LanguageModel:
    """This model in the form the runtime trains and samples."""
    return LanguageModel(
        name=name,
        specs=param_specs(cfg),
        apply=lambda params, tokens, constrain: forward(params, tokens, cfg, constrain),
        flops_per_token=lambda seq_len: flops_per_token(cfg, seq_len),
        vocab_size=cfg.vocab_size,
        config=cfg,
        compute_dtype=jnp.dtype(cfg.dtype),
        loss=None if cfg.loss_impl == "xla" else (
            lambda params, tokens, targets, mask, constrain:
                loss_sums(params, tokens, targets, mask, cfg, constrain)),
    )
