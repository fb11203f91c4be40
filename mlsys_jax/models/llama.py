"""A Llama-family decoder as pure functions: parameter specs, the pieces of its forward pass.

    h_0     = E[tokens]                                                      embed
    a_l     = h_{l-1} + Attn(RMSNorm(h_{l-1}))   (RoPE on q and k at each    block, layer l
    h_l     = a_l + W_down(silu(W_gate x) * W_up x),  x = RMSNorm(a_l)        token's position)
    logits  = RMSNorm(h_L) W_head                (W_head = E^T when tied)    head

The variants of the family are config fields: Llama 3's stretched rotary frequencies
(``rope_scaling``), Mistral's sliding-window attention (``sliding_window``) and Qwen2's biases
on q, k and v (``qkv_bias``).

Layers are stacked on a leading ``layers`` axis; ``models.base`` scans them. With a KV cache a
block writes its keys and values at the tokens' positions and attends over the cache. Weights
and activations name logical axes only; a plan maps them to a mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mlsys_jax.models import base, kernel_ops, tensor_parallel
from mlsys_jax.models.base import UNPLACED, LanguageModel, Layout, LogicalAxes, PagedKV
from mlsys_jax.models.config import CONFIGS, LlamaConfig
from mlsys_jax.models.layers import (
    apply_rope,
    cache_write,
    embedding_lookup,
    paged_write,
    qkv_projection,
    rope_angles,
    swiglu,
)
from mlsys_jax.models.quantized import as_compute, cast_tree
from mlsys_jax.models.registry import Family
from mlsys_jax.params import ParamSpec, fan_in, normal, ones, zeros

Params = dict[str, Any]

AXES = LogicalAxes(
    params=("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"),
    activations=("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "cache_seq", "layers"),
)
CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
#: Each matmul weight's input (contracting) dims, for int8 storage per output channel.
QUANTIZABLE = {
    "embed": (1,),  # per row: per output channel of the tied head, per token of the lookup
    "head": (0,),
    "layers/wq": (1,),
    "layers/wk": (1,),
    "layers/wv": (1,),
    "layers/wo": (1, 2),
    "layers/w_gate": (1,),
    "layers/w_up": (1,),
    "layers/w_down": (1,),
}


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
        **(
            {
                "bq": p((h, hd), ("heads", "head_dim"), zeros),
                "bk": p((k, hd), ("kv_heads", "head_dim"), zeros),
                "bv": p((k, hd), ("kv_heads", "head_dim"), zeros),
            }
            if cfg.qkv_bias
            else {}
        ),
        "wo": p((h, hd, d), ("heads", "head_dim", "embed"), fan_in((0, 1), out_scale)),
        "mlp_norm": p((d,), ("embed",), ones),
        "w_gate": p((d, f), ("embed", "mlp"), fan_in(0)),
        "w_up": p((d, f), ("embed", "mlp"), fan_in(0)),
        "w_down": p((f, d), ("mlp", "embed"), fan_in(0, out_scale)),
    }
    specs: Params = {
        # Tied tables double as the output head, so they start at the head's 1/sqrt(d) scale.
        "embed": p((v, d), ("vocab", "embed"), normal(d**-0.5 if cfg.tie_embeddings else 1.0)),
        "layers": {name: s.stacked(cfg.n_layers) for name, s in layer.items()},
        "final_norm": p((d,), ("embed",), ones),
    }
    if not cfg.tie_embeddings:
        specs["head"] = p((d, v), ("embed", "vocab"), fan_in(0))
    return specs


def page_specs(cfg: LlamaConfig, num_blocks: int, block_size: int) -> Params:
    """The pools of a paged KV cache: every layer's keys and values in ``num_blocks`` blocks of
    ``block_size`` positions, in the compute dtype."""
    shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
    spec = ParamSpec(shape, ("layers", None, None, "kv_heads", "head_dim"), zeros, jnp.dtype(cfg.dtype))
    return {"k": spec, "v": spec}


def cache_specs(cfg: LlamaConfig, batch: int, max_len: int) -> Params:
    """Keys and values of every layer for ``batch`` rows of ``max_len`` positions, in the
    compute dtype."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    spec = ParamSpec(shape, CACHE_AXES, zeros, jnp.dtype(cfg.dtype))
    return {"k": spec, "v": spec}


def _norm(cfg: LlamaConfig, x: jax.Array, w: jax.Array, layout: Layout) -> jax.Array:
    return kernel_ops.rms_norm(x, w, cfg.norm_eps, cfg.norm_impl, layout)


def _sequence_parallel(cfg: LlamaConfig, layout: Layout, shape: tuple[int, ...]) -> Layout | None:
    """The residual stream's layout under collective tensor-parallel matmuls, or None where the
    block keeps its einsums (``tp_matmul="xla"``, or no tensor split that fits: see
    ``tensor_parallel.sequence_parallel``)."""
    if cfg.tp_matmul != "collective":
        return None
    return tensor_parallel.sequence_parallel(layout, shape, (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff))


def embed(
    cfg: LlamaConfig, params: Params, tokens: jax.Array, positions: jax.Array, layout: Layout = UNPLACED
) -> jax.Array:
    """h_0 = E[tokens], (batch, seq, d_model) in the compute dtype (positions enter at RoPE)."""
    del positions
    table = layout.constrain(as_compute(params["embed"], cfg.dtype), ("vocab", None))  # whole rows
    return layout.constrain(embedding_lookup(table, tokens), ("batch", "seq", "embed"))


def block(
    cfg: LlamaConfig,
    w: Params,
    x: jax.Array,
    positions: jax.Array,
    cache: Params | None = None,
    layout: Layout = UNPLACED,
) -> tuple[jax.Array, Params | None]:
    """One layer: attention then SwiGLU, each on the RMSNorm of the residual stream. With a
    cache, the new keys and values are written at ``positions`` (contiguous cache) or at the
    cache's slots (``PagedKV``, positions (batch, seq)) and the queries attend over it."""
    w = cast_tree(w, cfg.dtype)
    c = layout.constrain
    sp = _sequence_parallel(cfg, layout, x.shape)  # the residual stream's layout, if split
    if sp is None:
        q, k, v = qkv_projection(_norm(cfg, x, w["attn_norm"], layout), w["wq"], w["wk"], w["wv"])
    else:
        x = sp.constrain(x, ("batch", "seq", "embed"))
        h = _norm(cfg, x, w["attn_norm"], sp)
        q, k, v = tensor_parallel.qkv_projection(h, w["wq"], w["wk"], w["wv"], sp)
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = apply_rope(c(q, ("batch", "seq", "heads", "head_dim")), cos, sin)
    k = apply_rope(c(k, ("batch", "seq", "kv_heads", "head_dim")), cos, sin)
    v = c(v, ("batch", "seq", "kv_heads", "head_dim"))
    if cache is None:
        o = kernel_ops.attention(q, k, v, cfg.attention_impl, layout, window=cfg.sliding_window)
    elif isinstance(cache, PagedKV):
        cache = cache._replace(k=paged_write(cache.k, k, cache.slots), v=paged_write(cache.v, v, cache.slots))
        o = kernel_ops.paged_attention(
            q, cache, positions[:, 0], cfg.paged_attention_impl, layout, window=cfg.sliding_window
        )
    else:
        start = jnp.broadcast_to(positions[..., 0], (x.shape[0],)).astype(jnp.int32)
        cache = {name: c(cache_write(cache[name], new, start), CACHE_AXES[1:]) for name, new in (("k", k), ("v", v))}
        o = kernel_ops.attention(
            q,
            cache["k"],
            cache["v"],
            cfg.attention_impl,
            layout,
            q_offset=start,
            kv_lengths=start + x.shape[1],
            window=cfg.sliding_window,
        )
    o = c(o, ("batch", "seq", "heads", "head_dim"))
    if sp is None:
        x = c(x + jnp.einsum("bshk,hkd->bsd", o, w["wo"]), ("batch", "seq", "embed"))
        x = x + swiglu(_norm(cfg, x, w["mlp_norm"], layout), w["w_gate"], w["w_up"], w["w_down"], c)
        return c(x, ("batch", "seq", "embed")), cache
    x = sp.constrain(x + tensor_parallel.out_projection(o, w["wo"], x, sp), ("batch", "seq", "embed"))
    h = _norm(cfg, x, w["mlp_norm"], sp)
    x = x + tensor_parallel.swiglu(h, w["w_gate"], w["w_up"], w["w_down"], sp)
    return sp.constrain(x, ("batch", "seq", "embed")), cache


def _head_weight(cfg: LlamaConfig, params: Params, dtype: Any) -> jax.Array:
    return as_compute(params["embed"], dtype).T if cfg.tie_embeddings else as_compute(params["head"], dtype)


def head(cfg: LlamaConfig, params: Params, x: jax.Array, layout: Layout = UNPLACED) -> jax.Array:
    """logits = RMSNorm(h_L) W_head in fp32, (batch, seq, vocab)."""
    x = _norm(cfg, x, params["final_norm"].astype(x.dtype), layout)
    return kernel_ops.logits(x, _head_weight(cfg, params, x.dtype), layout)


def loss(
    cfg: LlamaConfig, params: Params, x: jax.Array, targets: jax.Array, mask: jax.Array, layout: Layout = UNPLACED
) -> tuple[jax.Array, jax.Array]:
    """(sum, count) of next-token cross-entropy of the head's logits; a fused ``loss_impl``
    never forms them whole."""
    x = _norm(cfg, x, params["final_norm"].astype(x.dtype), layout)
    return kernel_ops.next_token_loss(x, _head_weight(cfg, params, x.dtype), targets, mask, cfg.loss_impl, layout)


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


def kernel_choices(cfg: LlamaConfig, batch: int, seq: int) -> dict[str, str]:
    """Which backend each hot operation of this config runs here (empty for plain XLA)."""
    return kernel_ops.kernel_choices(
        cfg.dtype,
        attention=(
            cfg.attention_impl,
            (batch, seq, cfg.n_heads, cfg.head_dim),
            (batch, seq, cfg.n_kv_heads, cfg.head_dim),
            cfg.sliding_window,
        ),
        norm=(cfg.norm_impl, (batch, seq, cfg.d_model)),
        loss=(cfg.loss_impl, (batch * seq, cfg.d_model), (cfg.d_model, cfg.vocab_size)),
        tp_matmul=cfg.tp_matmul,
    )


def language_model(cfg: LlamaConfig, name: str = "llama") -> LanguageModel:
    """This model in the form the runtime trains, stages and decodes."""
    bind = functools.partial
    return LanguageModel(
        name=name,
        specs=param_specs(cfg),
        embed=bind(embed, cfg),
        block=bind(block, cfg),
        head=bind(head, cfg),
        loss=bind(loss, cfg),
        cache_specs=bind(cache_specs, cfg),
        page_specs=bind(page_specs, cfg),
        quantizable={k: v for k, v in QUANTIZABLE.items() if k != "head" or not cfg.tie_embeddings},
        max_position=cfg.max_position,
        flops_per_token=bind(flops_per_token, cfg),
        vocab_size=cfg.vocab_size,
        num_layers=cfg.n_layers,
        axes=AXES,
        config=cfg,
        compute_dtype=jnp.dtype(cfg.dtype),
        remat=cfg.remat,
        kernel_choices=bind(kernel_choices, cfg),
    )


def forward(params: Params, tokens: jax.Array, cfg: LlamaConfig, layout: Layout = UNPLACED) -> jax.Array:
    """Next-token logits in fp32, (batch, seq, vocab), for int tokens of shape (batch, seq)."""
    return base.forward(language_model(cfg), params, tokens, layout)


FAMILY = Family("llama", LlamaConfig, CONFIGS, AXES, language_model)
