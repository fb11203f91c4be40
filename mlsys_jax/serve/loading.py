"""What ``mlsys-jax serve`` serves, loaded onto its plan: a training run's newest (or chosen)
checkpoint with the tokenizer it trained with, or a Hugging Face folder read into place."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlsys_jax.mesh import make_mesh, parse_axis_sizes, simulate_cpu_devices
from mlsys_jax.models import hf, llama
from mlsys_jax.models.base import ConfigError, LanguageModel
from mlsys_jax.parallel import Plan, rules
from mlsys_jax.serve.config import ServeConfig
from mlsys_jax.serve.engine import Engine, EngineConfig
from mlsys_jax.tokenizer import ByteTokenizer, load_tokenizer
from mlsys_jax.train.saved import restore_run


def engine_plan(mesh: str | None) -> Plan:
    """Tensor parallelism over the heads (``tensor=N``), or one device."""
    sizes = parse_axis_sizes(mesh) if mesh else {"tensor": 1}
    if set(sizes) - {"tensor"}:
        raise ConfigError(f"--mesh {mesh!r}: the engine splits over 'tensor' only (e.g. --mesh tensor=2)")
    return Plan(make_mesh(sizes), rules("tp"))


def engine_config(cfg: ServeConfig) -> EngineConfig:
    return EngineConfig(
        max_seqs=cfg.max_seqs,
        block_size=cfg.block_size,
        num_blocks=cfg.num_blocks,
        prefill_chunk=cfg.prefill_chunk,
        scheduler=cfg.scheduler,
        batch_timeout_s=cfg.batch_timeout_ms / 1000,
    )


def context_of(model: LanguageModel, trained_seq: int | None) -> int:
    """The model's maximum position, or the sequence length it was trained on when it states none."""
    limit = model.max_position or trained_seq
    if limit is None:
        raise ConfigError(f"model {model.name!r} states no maximum position. Fix: set max_position in its config.")
    return int(limit)


def engine_for(cfg: ServeConfig) -> Engine:
    """The engine ``cfg`` asks for, its model and parameters placed on the engine's plan."""
    sizes = parse_axis_sizes(cfg.mesh) if cfg.mesh else {"tensor": 1}
    simulate_cpu_devices(cfg.simulate_devices or math.prod(sizes.values()), check=False)
    plan = engine_plan(cfg.mesh)
    name = cfg.model_name or Path(cfg.ckpt_dir or cfg.hf or "model").expanduser().resolve().name
    params: Any
    if cfg.hf is not None:
        ckpt = hf.open_checkpoint(cfg.hf, dtype=cfg.dtype)
        model = llama.language_model(ckpt.config, f"hf:{cfg.hf}")
        params = hf.load_params(ckpt, model.specs, plan.param_shardings(model.specs))
        folder = Path(cfg.hf).expanduser()
        tokenizer = load_tokenizer(str(folder)) if (folder / "tokenizer.json").is_file() else ByteTokenizer()
        context = context_of(model, None)
    else:
        assert cfg.ckpt_dir is not None
        saved = restore_run(cfg.ckpt_dir, cfg.step, lambda _: plan, dtype=cfg.dtype)
        model, params = saved.model, saved.params
        tokenizer = load_tokenizer(saved.settings.get("tokenizer"))
        context = context_of(model, saved.settings.get("seq"))
    return Engine(model, plan, params, tokenizer, context_limit=context, config=engine_config(cfg), model_name=name)
