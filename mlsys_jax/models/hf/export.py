"""Our Llama-family parameters as a Hugging Face folder: config.json, safetensors shards with
their index, and the tokenizer files of the folder the model came from."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.hf.config import HFError, to_hf
from mlsys_jax.models.hf.files import DTYPES, write_folder
from mlsys_jax.models.hf.names import file_tensors

#: Files beside the weights that travel with a model (tokenizer, chat template, generation defaults).
COMPANIONS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_SHARD_BYTES = 5 * 2**30


Fetch = Callable[[str, "int | None"], np.ndarray]


def file_arrays(cfg: LlamaConfig, fetch: Fetch, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor in ``dtype``) in transformers' order; ``fetch(path, layer)`` gives our
    parameter at a ``layers/wq``-style path as a host array, one layer of a stacked one at a
    time (so the host holds one file tensor at a time, never a whole stack)."""
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    for name, m, layer in file_tensors(cfg):
        yield name, m.to_file(np.asarray(fetch("/".join(m.path), layer))).astype(DTYPES[dtype])


def tree_fetch(params: Any) -> Fetch:
    """``fetch`` over a parameter tree (host or device arrays): one layer is moved at a time."""

    def fetch(path: str, layer: int | None) -> np.ndarray:
        node = params
        for part in path.split("/"):
            node = node[part]
        return np.asarray(node if layer is None else node[layer])

    return fetch


def export_folder(
    cfg: LlamaConfig,
    fetch: Fetch,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    source: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_files: dict[str, bytes] | None = None,
) -> list[Path]:
    """Write the model to a new folder ``out``; ``source`` (the folder it was imported from, if
    any) gives config.json's ids and spelling and the tokenizer files to copy; ``extra_files``
    (a tokenizer's, say) go in too, all at once."""
    base: dict[str, Any] | None = None
    extra: dict[str, bytes] = dict(extra_files or {})
    if source is not None:
        src = Path(source).expanduser()
        if (src / "config.json").is_file():
            base = json.loads((src / "config.json").read_text())
        extra.update({name: (src / name).read_bytes() for name in COMPANIONS if (src / name).is_file()})
    config = json.dumps(to_hf(cfg, dtype, base), indent=2) + "\n"
    extra["config.json"] = config.encode()
    return write_folder(out, file_arrays(cfg, fetch, dtype), max_shard_bytes=max_shard_bytes, extra_files=extra)
