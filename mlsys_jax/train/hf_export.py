"""A training run's checkpoint as a Hugging Face folder (``mlsys-jax export-hf``): the step's
parameters restored onto one device, written as safetensors shards with config.json and the
run's tokenizer files, whole or not at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax

from mlsys_jax.mesh import make_mesh
from mlsys_jax.models import hf
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.hf.export import COMPANIONS, tree_fetch
from mlsys_jax.parallel import Plan, rules
from mlsys_jax.train.checkpoint import CheckpointError
from mlsys_jax.train.saved import SavedRun, restore_run


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


def check_family(saved: SavedRun) -> LlamaConfig:
    """The Llama-family config of a saved run, or one error when its family has no Hugging Face form."""
    config = saved.model.config
    if not isinstance(config, LlamaConfig):
        raise CheckpointError(
            f"the run in {saved.directory} trained model {saved.settings['model']!r}, not a Llama-family model; "
            "export-hf writes Llama, Mistral and Qwen2 folders only."
        )
    return config


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
    if Path(cfg.out).expanduser().exists():
        raise hf.HFError(f"--out {cfg.out} already exists. Fix: give a new folder, or remove the old one first.")
    if cfg.max_shard_mb < 1:
        raise hf.HFError(f"--max-shard-mb must be at least 1, got {cfg.max_shard_mb}")
    plan = lambda model: Plan(make_mesh({"data": 1}, devices=jax.devices()[:1]), rules("dp"))
    saved = restore_run(directory, cfg.step, plan)
    model_cfg = check_family(saved)
    settings, step = saved.settings, saved.step
    source = settings.get("init_from_hf")
    source = source if source is not None and (Path(source).expanduser() / "config.json").is_file() else None
    files = hf.export_folder(
        model_cfg,
        tree_fetch(saved.params),
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
