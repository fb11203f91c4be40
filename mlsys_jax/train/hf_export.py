"""A training run's checkpoint as a Hugging Face folder (``mlsys-jax export-hf``): the step's
parameters restored onto one device, written as safetensors shards with config.json and the
run's tokenizer files, whole or not at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax

from mlsys_jax.mesh import make_mesh
from mlsys_jax.models import hf, llama, registry
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.hf.export import COMPANIONS, tree_fetch
from mlsys_jax.parallel import Plan, rules
from mlsys_jax.train.checkpoint import Checkpointer, CheckpointError
from mlsys_jax.train.optim import OptimConfig, adamw
from mlsys_jax.train.state import abstract_state


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Write a run's checkpoint as a Hugging Face folder (config.json, *.safetensors, tokenizer)."""

    ckpt_dir: str
    """The run's --ckpt-dir."""
    out: str
    """The folder to create (it must not exist yet)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the tensors on disk."""
    step: int | None = None
    """Which checkpoint (default: the newest)."""
    max_shard_mb: int = 5120
    """Largest safetensors file, in MiB (more tensors go to more shards, with an index)."""
    debug: bool = False
    """Show the Python traceback of an error as well as its message."""


def run_model(settings: dict[str, Any], where: Path) -> LlamaConfig:
    """The Llama-family config a run recorded, or one error when its family has no Hugging Face form."""
    family, _ = registry.parse_model(settings["model"]) if settings["model"].startswith("hf:") is False else (None, "")
    if family is not None and family.build is not llama.language_model:
        raise CheckpointError(
            f"the run in {where} trained model {settings['model']!r}, not a Llama-family model; export-hf "
            "writes Llama, Mistral and Qwen2 folders only."
        )
    return LlamaConfig(**settings["model_config"])


def tokenizer_files(settings: dict[str, Any]) -> dict[str, bytes]:
    """The files of the tokenizer the run read its text with (none for the byte tokenizer)."""
    spec = settings.get("tokenizer")
    if spec in (None, "byte"):
        return {}
    folder = Path(spec).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    return {name: (folder / name).read_bytes() for name in COMPANIONS if (folder / name).is_file()}


def export_run(cfg: ExportConfig, say: Any = print) -> list[Path]:
    """Export the chosen step of a run; returns the files written."""
    directory = Path(cfg.ckpt_dir).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"--ckpt-dir {cfg.ckpt_dir!r} is not a folder. Fix: give the run's --ckpt-dir.")
    if Path(cfg.out).expanduser().exists():
        raise hf.HFError(f"--out {cfg.out} already exists. Fix: give a new folder, or remove the old one first.")
    if cfg.max_shard_mb < 1:
        raise hf.HFError(f"--max-shard-mb must be at least 1, got {cfg.max_shard_mb}")
    ckpt = Checkpointer(directory)
    step = ckpt.latest_step() if cfg.step is None else cfg.step
    if step is None or step not in ckpt.all_steps():
        raise CheckpointError(
            f"{directory} holds no checkpoint"
            + (f" at step {step}" if step is not None else "")
            + f" (steps: {ckpt.all_steps() or 'none'}). Fix: give the run's --ckpt-dir, or one of its steps."
        )
    settings = ckpt.read_meta(step)
    model_cfg = run_model(settings, directory)
    model = llama.language_model(model_cfg)
    plan = Plan(make_mesh({"data": 1}, devices=jax.devices()[:1]), rules("dp"))
    optimizer = adamw(
        OptimConfig(lr=settings["lr"], warmup_steps=settings["warmup"], total_steps=settings["steps"]), model.specs
    )
    state = ckpt.restore(abstract_state(plan, model.specs, optimizer), step).state
    ckpt.close()

    source = settings.get("init_from_hf")
    source = source if source is not None and (Path(source).expanduser() / "config.json").is_file() else None
    files = hf.export_folder(
        model_cfg,
        tree_fetch(state.params),
        cfg.out,
        dtype=cfg.dtype,
        source=source,
        max_shard_bytes=cfg.max_shard_mb * 2**20,
        extra_files=tokenizer_files(settings),
    )
    say(f"wrote step {step} of {directory} to {cfg.out} ({cfg.dtype}, {len(files)} files)")
    if settings.get("tokenizer") in (None, "byte"):
        say("the run read UTF-8 bytes (ids 0-255, end of document 258): no tokenizer files to write")
    return files
