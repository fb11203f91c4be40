"""A Hugging Face Llama-family folder as our config and parameters, read into place.

``open_checkpoint`` reads config.json and every safetensors header and checks each tensor's
name and shape against the config, before any array exists; ``load_params`` then builds each
parameter with the caller's sharding from per-device callbacks, so a process reads only the
boxes its own devices hold (layer by layer for the stacked weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mlsys_jax.models.config import LlamaConfig
from mlsys_jax.models.hf.config import HFError, from_hf, read_config
from mlsys_jax.models.hf.files import SafetensorsFolder
from mlsys_jax.models.hf.names import Mapping, file_tensors, mappings, normalize
from mlsys_jax.params import path_str

#: Tensors some checkpoints carry that hold nothing the model computes with.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class HFCheckpoint:
    """A checked Hugging Face folder: its raw config, our config, and its tensors by name."""

    folder: Path
    raw: dict[str, Any]
    config: LlamaConfig
    tensors: SafetensorsFolder


def open_checkpoint(folder: str | Path, **overrides: Any) -> HFCheckpoint:
    """Read and check a folder (config, index, shards, every tensor's shape) without reading any
    tensor's values; ``overrides`` set how the model runs (dtype, kernels)."""
    folder = Path(folder).expanduser()
    raw = read_config(folder)
    cfg = from_hf(raw, str(folder / "config.json"), **overrides)
    tensors = SafetensorsFolder(folder)
    expected = {name: m.file_shape for name, m, _ in file_tensors(cfg)}
    for name, shape in expected.items():
        if name not in tensors.shapes:
            raise HFError(
                f"{folder} has no tensor {name!r}, which its config.json implies. Fix: check that the "
                "config and the weights belong to the same model."
            )
        if tensors.shapes[name] != shape:
            raise HFError(
                f"{folder}: tensor {name!r} has shape {list(tensors.shapes[name])} in {tensors.files[name].name}, "
                f"but config.json implies {list(shape)}. Fix: check that the config and the weights belong to "
                "the same model."
            )
        if tensors.dtypes[name] not in ("float32", "bfloat16", "float16"):
            raise HFError(
                f"{folder}: tensor {name!r} is {tensors.dtypes[name]}; float32, bfloat16 and float16 are read"
            )
    tied_head = cfg.tie_embeddings and "lm_head.weight" in tensors.shapes
    extra = sorted(
        n
        for n in set(tensors.shapes) - set(expected)
        if not n.endswith(HARMLESS_SUFFIXES) and not (tied_head and n == "lm_head.weight")
    )
    if extra:
        raise HFError(
            f"{folder} holds tensor {extra[0]!r}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ", which this model does not use, so the logits would not be the checkpoint's. Fix: check "
            "config.json (a bias or a head this family lacks?)."
        )
    return HFCheckpoint(folder, raw, cfg, tensors)


def by_path(cfg: LlamaConfig) -> dict[str, Mapping]:
    """Each of our parameter paths (``layers/wq``) and the file tensor(s) it comes from."""
    return {"/".join(m.path): m for m in mappings(cfg)}


def _reader(ckpt: HFCheckpoint, m: Mapping, shape: tuple[int, ...], dtype: Any) -> Any:
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        box = normalize(index, shape)
        key = tuple((s.start, s.stop) for s in box)
        if key not in cache:  # replicated copies on several local devices read once
            if m.layered:
                layers = range(box[0].start, box[0].stop)
                block = np.stack([m.read_box(box[1:], i, ckpt.tensors.read) for i in layers])
            else:
                block = m.read_box(box, None, ckpt.tensors.read)
            cache[key] = np.ascontiguousarray(block.astype(dtype))
        return cache[key]

    return read


def load_params(ckpt: HFCheckpoint, specs: Any, shardings: Any) -> Any:
    """The checkpoint's weights as a tree like ``specs`` (``ParamSpec`` leaves), each array built
    in its sharding from the boxes this process's devices hold, in the spec's dtype."""
    table = by_path(ckpt.config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: hasattr(x, "logical_axes"))
    out = []
    for (path, spec), sharding in zip(leaves, jax.tree_util.tree_leaves(shardings)):
        name = path_str(path)
        if name not in table:
            raise HFError(f"parameter {name} has no tensor in a Hugging Face checkpoint of this family")
        out.append(
            jax.make_array_from_callback(spec.shape, sharding, _reader(ckpt, table[name], spec.shape, spec.dtype))
        )
    return jax.tree_util.tree_unflatten(treedef, out)
