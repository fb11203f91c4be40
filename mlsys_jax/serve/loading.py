"""What ``mlsys-jax serve`` serves, loaded onto its plans (one per data-parallel replica): a training run's newest (or chosen)
checkpoint with the tokenizer it trained with, or a Hugging Face folder read into place."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax

from mlsys_jax.mesh import make_mesh, parse_axis_sizes, simulate_cpu_devices
from mlsys_jax.models import hf, llama
from mlsys_jax.models.base import ConfigError, LanguageModel
from mlsys_jax.models.quantized import quantize_params
from mlsys_jax.parallel import Plan, rules
from mlsys_jax.serve.config import ServeConfig
from mlsys_jax.serve.engine import Engine, EngineConfig
from mlsys_jax.serve.replicas import Replicas
from mlsys_jax.tokenizer import ByteTokenizer, load_tokenizer
from mlsys_jax.train.saved import restore_run


def replica_plans(mesh: str | None) -> list[Plan]:
    """One plan per data-parallel replica (``data=R``), each splitting the heads over its own
    ``tensor=T`` devices; one device when no mesh is given."""
    sizes = parse_axis_sizes(mesh) if mesh else {}
    if set(sizes) - {"data", "tensor"}:
        raise ConfigError(
            f"--mesh {mesh!r}: the engine splits over 'tensor' (heads) and replicates over 'data' "
            "(e.g. --mesh data=2,tensor=2)"
        )
    replicas, tensor = sizes.get("data", 1), sizes.get("tensor", 1)
    devices = jax.devices()
    if replicas * tensor > len(devices):
        raise ConfigError(f"--mesh {mesh!r} needs {replicas * tensor} devices; {len(devices)} are here")
    groups = [devices[r * tensor : (r + 1) * tensor] for r in range(replicas)]
    return [Plan(make_mesh({"tensor": tensor}, devices=group), rules("tp")) for group in groups]


def engine_config(cfg: ServeConfig) -> EngineConfig:
    return EngineConfig(
        max_seqs=cfg.max_seqs,
        block_size=cfg.block_size,
        num_blocks=cfg.num_blocks,
        prefill_chunk=cfg.prefill_chunk,
        scheduler=cfg.scheduler,
        batch_timeout_s=cfg.batch_timeout_ms / 1000,
        kv_cache=cfg.kv_cache,
    )


def context_of(model: LanguageModel, trained_seq: int | None) -> int:
    """The model's maximum position, or the sequence length it was trained on when it states none."""
    limit = model.max_position or trained_seq
    if limit is None:
        raise ConfigError(f"model {model.name!r} states no maximum position. Fix: set max_position in its config.")
    return int(limit)


def engine_for(cfg: ServeConfig) -> Engine | Replicas:
    """The engine ``cfg`` asks for (one per data-parallel replica), its model and parameters
    placed on each replica's plan."""
    sizes = parse_axis_sizes(cfg.mesh) if cfg.mesh else {}
    simulate_cpu_devices(cfg.simulate_devices or max(1, math.prod(sizes.values())), check=False)
    name = cfg.model_name or Path(cfg.ckpt_dir or cfg.hf or "model").expanduser().resolve().name
    engines = [_engine(cfg, plan, name) for plan in replica_plans(cfg.mesh)]
    return engines[0] if len(engines) == 1 else Replicas(engines)


def _engine(cfg: ServeConfig, plan: Plan, name: str) -> Engine:
    params: Any
    if cfg.hf is not None:
        ckpt = hf.open_checkpoint(cfg.hf, dtype=cfg.dtype)
        model = llama.language_model(ckpt.config.replace(paged_attention_impl=cfg.paged_attention), f"hf:{cfg.hf}")
        params = hf.load_params(ckpt, model.specs, plan.param_shardings(model.specs))
        folder = Path(cfg.hf).expanduser()
        tokenizer = load_tokenizer(str(folder)) if (folder / "tokenizer.json").is_file() else ByteTokenizer()
        context = context_of(model, None)
    else:
        assert cfg.ckpt_dir is not None
        saved = restore_run(
            cfg.ckpt_dir, cfg.step, lambda _: plan, dtype=cfg.dtype, paged_attention_impl=cfg.paged_attention
        )
        model, params = saved.model, saved.params
        tokenizer = load_tokenizer(saved.settings.get("tokenizer"))
        context = context_of(model, saved.settings.get("seq"))
    if cfg.weights == "int8":
        params = jax.jit(lambda p: quantize_params(p, model.quantizable))(params)
    return Engine(model, plan, params, tokenizer, context_limit=context, config=engine_config(cfg), model_name=name)
