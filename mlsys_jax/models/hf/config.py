"""A Hugging Face ``config.json`` of a Llama-family model as our ``LlamaConfig``, and back.

Llama 2 and 3, Mistral and Qwen2 share one architecture up to the fields below; both spellings
of the rotary settings in use are read (``rope_theta`` with ``rope_scaling``, and transformers
5's ``rope_parameters``). A field that would change the computation in a way this family does
not implement is refused by name, never dropped: a silently ignored field is silently wrong
logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlsys_jax.models.base import ConfigError
from mlsys_jax.models.config import LlamaConfig, RopeScaling


class HFError(ConfigError):
    """A Hugging Face folder this toolkit cannot read as asked."""


#: model_type -> the transformers class that holds it (what export writes in ``architectures``).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

#: Fields that never change what the model computes (ids, bookkeeping, on-disk dtype, caching).
IGNORED = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "pretraining_tp",  # a split of the same matmuls, for reproducing old numerics on GPUs
        "max_window_layers",  # read only when use_sliding_window is set (refused below)
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tokenizer_class",
    }
)

#: Fields read into the config (see ``from_hf``).
READ = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "max_position_embeddings",
        "sliding_window",
        "use_sliding_window",
        "layer_types",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "attention_dropout",
    }
)


def read_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict, or one error naming what is missing or unreadable."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise HFError(
            f"{str(folder)!r} is not a folder. Fix: give the local folder of a Hugging Face checkpoint "
            "(the one holding config.json and *.safetensors)."
        )
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint folder. Fix: give the "
            "folder that holds config.json beside the *.safetensors files."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{path} cannot be read as JSON ({err}). Fix: restore the file from its source.") from err
    if not isinstance(data, dict):
        raise HFError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _need(raw: dict[str, Any], key: str, where: str) -> Any:
    if raw.get(key) is None:
        raise HFError(f"{where} has no {key!r}, which a Llama-family model needs. Fix: add it to config.json.")
    return raw[key]


def _refuse(where: str, field: str, value: Any, why: str) -> HFError:
    return HFError(f"{where}: unsupported field {field}={value!r} ({why}). Only Llama 2/3, Mistral and Qwen2 are read.")


def _rope(raw: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either spelling."""
    params = raw.get("rope_parameters")
    if params is not None:
        field = "rope_parameters"
        theta = params.get("rope_theta", raw.get("rope_theta", 10_000.0))
        scaling = dict(params)
    else:
        field = "rope_scaling"
        theta = raw.get("rope_theta", 10_000.0)
        scaling = dict(raw.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if kind == "default":
        if scaling:
            raise _refuse(where, f"{field}.{min(scaling)}", scaling[min(scaling)], "no default rope takes it")
        return float(theta), None
    if kind == "linear":
        known = {"factor"}
        out = RopeScaling(kind="linear", factor=float(scaling.get("factor", 1.0)))
    elif kind == "llama3":
        known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        out = RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position=int(scaling["original_max_position_embeddings"]),
        )
    else:
        raise _refuse(where, f"{field}.rope_type", kind, "the rope scalings read are llama3 and linear")
    extra = sorted(set(scaling) - known)
    if extra:
        raise _refuse(
            where, f"{field}.{extra[0]}", scaling[extra[0]], f"{kind} rope scaling takes only {sorted(known)}"
        )
    return float(theta), out


def _window(raw: dict[str, Any], model_type: str, where: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type == "qwen2" or "use_sliding_window" in raw:
        if raw.get("use_sliding_window"):
            raise _refuse(where, "use_sliding_window", True, "Qwen2's per-layer windows are not implemented")
        window = None
    types = set(raw.get("layer_types") or [])
    if types - {"full_attention", "sliding_attention"} or len(types) > 1:
        raise _refuse(where, "layer_types", sorted(types), "every layer must attend alike")
    if types == {"full_attention"}:
        window = None
    if types == {"sliding_attention"} and window is None:
        raise _refuse(where, "layer_types", ["sliding_attention"], "sliding layers need sliding_window")
    return None if window is None else int(window)


def from_hf(raw: dict[str, Any], where: str = "config.json", **overrides: Any) -> LlamaConfig:
    """Our config for a Hugging Face Llama-family ``config.json`` (already parsed); ``overrides``
    set fields that say how to run (dtype, kernels, remat)."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFError(
            f"{where}: model_type {model_type!r} is not supported; the architectures read are "
            f"{sorted(ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2). Fix: convert the model to one of them, or "
            "write a model family for it."
        )
    for arch in raw.get("architectures") or []:
        if arch not in ARCHITECTURES.values():
            raise _refuse(where, "architectures", arch, f"the heads read are {sorted(ARCHITECTURES.values())}")
    unknown = sorted(set(raw) - IGNORED - READ)
    if unknown:
        raise HFError(
            f"{where}: unsupported field {unknown[0]!r}={raw[unknown[0]]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + ": this toolkit does not know what it changes, and will not guess. Fix: if it does not change "
            "the computation, remove it from config.json."
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", raw["hidden_act"], "the MLP is SwiGLU with silu")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field):
            raise _refuse(where, field, raw[field], "no output or MLP biases in this family")
    if raw.get("attention_dropout", 0.0):
        raise _refuse(where, "attention_dropout", raw["attention_dropout"], "training here uses no dropout")
    d = int(_need(raw, "hidden_size", where))
    heads = int(_need(raw, "num_attention_heads", where))
    theta, scaling = _rope(raw, where)
    cfg = LlamaConfig(
        vocab_size=int(_need(raw, "vocab_size", where)),
        d_model=d,
        n_layers=int(_need(raw, "num_hidden_layers", where)),
        n_heads=heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or d // heads),
        d_ff=int(_need(raw, "intermediate_size", where)),
        rope_theta=theta,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        sliding_window=_window(raw, model_type, where),
        qkv_bias=model_type == "qwen2",
        max_position=raw.get("max_position_embeddings"),
    )
    return cfg.replace(**overrides) if overrides else cfg


def model_type_of(cfg: LlamaConfig) -> str:
    """The Hugging Face architecture that holds this config: Qwen2 for q/k/v biases, Mistral for a
    sliding window, Llama otherwise."""
    if cfg.qkv_bias:
        if cfg.sliding_window is not None:
            raise HFError("no Hugging Face architecture has both q/k/v biases and one sliding window for every layer")
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def to_hf(cfg: LlamaConfig, dtype: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` for our config, saved in ``dtype``; ``base`` (the config the model was
    imported from) keeps its ids and its spelling of the rotary settings."""
    model_type = model_type_of(cfg)
    kept = IGNORED - {"_name_or_path", "transformers_version"}
    out: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in kept}
    rope: dict[str, Any] | None = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            rope.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position,
            )
    out.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position or 2048,
        attention_dropout=0.0,
    )
    if base is not None and "rope_parameters" in base:
        out["rope_parameters"] = {"rope_type": "default", **(rope or {}), "rope_theta": cfg.rope_theta}
    else:
        out.update(rope_theta=cfg.rope_theta, rope_scaling=rope)
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    out.pop("dtype", None)
    out["torch_dtype" if "dtype" not in (base or {}) else "dtype"] = dtype
    return out
