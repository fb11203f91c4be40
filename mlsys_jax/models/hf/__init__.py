"""Hugging Face Llama-family checkpoints in and out: ``hf:PATH`` names a local folder as a model
(its config.json is the config), ``open_checkpoint``/``load_params`` read its weights into
place, ``export_folder`` writes ours back in the same format."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path

from mlsys_jax.models import llama
from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.hf.checkpoint import HFCheckpoint, load_params, open_checkpoint
from mlsys_jax.models.hf.config import HFError, from_hf, read_config, to_hf
from mlsys_jax.models.hf.export import export_folder
from mlsys_jax.models.registry import Family


@lru_cache(maxsize=16)
def _config_at(folder: str, mtime: float) -> LlamaConfig:
    del mtime  # part of the cache key only: an edited config.json is read again
    return from_hf(read_config(folder), str(Path(folder) / "config.json"))


class Folders(Mapping[str, LlamaConfig]):
    """The ``hf`` family's presets: any local folder, its config read from its config.json."""

    def __getitem__(self, folder: str) -> LlamaConfig:
        path = Path(folder).expanduser()
        stamp = (path / "config.json").stat().st_mtime if (path / "config.json").is_file() else 0.0
        return _config_at(str(path), stamp)

    def __contains__(self, folder: object) -> bool:
        return isinstance(folder, str) and bool(folder)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


FAMILY = Family("hf", LlamaConfig, Folders(), llama.AXES, llama.language_model)

__all__ = [
    "FAMILY",
    "HFCheckpoint",
    "HFError",
    "export_folder",
    "from_hf",
    "load_params",
    "open_checkpoint",
    "read_config",
    "to_hf",
]
