"""safetensors files of a Hugging Face folder: read by slices, written whole or not at all.

A checkpoint is one ``model.safetensors`` or many shards listed by ``model.safetensors.index.json``.
Reads go through ``safetensors``' slicing (the files are memory-mapped), so a process reads the
boxes its devices hold and nothing else; every read is counted, which is how a test shows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes  # registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mlsys_jax.models.hf.config import HFError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
FILE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class HFWriteError(RuntimeError):
    """An export that could not be written; nothing was left at its destination."""


@dataclasses.dataclass
class Reads:
    """What has been read: (tensor name, box) in order, and the bytes they held."""

    boxes: list[tuple[str, tuple[slice, ...]]] = dataclasses.field(default_factory=list)
    nbytes: int = 0


class SafetensorsFolder:
    """The tensors of a folder by name: shapes and dtypes from the headers alone, values by box."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self._handles: dict[Path, Any] = {}
        self.files = self._files()
        self.reads = Reads()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name, path in self.files.items():
            handle = self._open(path)
            if name not in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                raise HFError(
                    f"{self.folder / INDEX} says tensor {name!r} is in {path.name}, which does not hold it. "
                    "Fix: download the checkpoint again (the index and the shards come from different versions)."
                )
            piece = handle.get_slice(name)
            self.shapes[name] = tuple(piece.get_shape())
            self.dtypes[name] = FILE_DTYPES.get(str(piece.get_dtype()), str(piece.get_dtype()))

    def _files(self) -> dict[str, Path]:
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise HFError(
                    f"{index} cannot be read ({err!r}). Fix: restore it from the checkpoint's source."
                ) from err
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise HFError(
                    f"{self.folder}: shard {missing[0]} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + f", though {INDEX} lists it. Fix: download the missing shard(s) into the folder."
                )
            return {name: self.folder / f for name, f in weight_map.items()}
        single = self.folder / SINGLE
        if not single.is_file():
            others = sorted(p.name for p in self.folder.glob("*.safetensors"))
            found = f" (it holds {others} but no {INDEX} to say what is where)" if others else ""
            raise HFError(
                f"{self.folder} has no {SINGLE} and no {INDEX}{found}. Fix: save the model with "
                "save_pretrained(..., safe_serialization=True); .bin and .pth files are not read."
            )
        handle = self._open(single)
        return {name: single for name in handle.keys()}  # noqa: SIM118

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except Exception as err:  # safetensors raises its own error types for a damaged header
                raise HFError(
                    f"{path} is not a readable safetensors file ({type(err).__name__}: {err}). Fix: download it again."
                ) from err
        return self._handles[path]

    def read(self, name: str, box: tuple[slice, ...]) -> np.ndarray:
        """The ``box`` of tensor ``name`` (one slice per dim), read from the mapped file."""
        try:
            out = np.asarray(self._open(self.files[name]).get_slice(name)[box])
        except Exception as err:  # a truncated file fails here, with safetensors' own error
            raise HFError(
                f"reading {name} from {self.files[name]} failed ({err}). Fix: download the file again."
            ) from err
        self.reads.boxes.append((name, box))
        self.reads.nbytes += out.nbytes
        return out


def write_folder(
    out: str | Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int,
    extra_files: dict[str, bytes] | None = None,
) -> list[Path]:
    """Write tensors as safetensors shards (with an index when more than one) plus ``extra_files``
    into a new folder ``out``: everything goes to a temporary folder beside it that is renamed into
    place at the end, so ``out`` is whole or absent. Returns the files written."""
    out = Path(out).expanduser()
    if out.exists():
        raise HFError(f"{out} already exists. Fix: give --out a new folder, or remove the old one first.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards = list(_shards(tensors, max_shard_bytes))
        names = (
            [SINGLE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            for key, value in shard.items():
                weight_map[key] = name
                total += value.nbytes
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        try:
            os.rename(tmp, out)
        except OSError as err:
            if out.exists():  # another export to the same folder finished first
                raise HFError(
                    f"{out} appeared while this export was writing; it was left as it is. Fix: give --out a new folder."
                ) from err
            raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HFWriteError(
            f"writing the export to {out} failed ({err.strerror or err}); nothing was written there and the "
            "checkpoint it came from is untouched. Fix: free space (or fix the folder's permissions) and run it again."
        ) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return sorted(out.iterdir())


def _shards(tensors: Iterable[tuple[str, np.ndarray]], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, value in tensors:
        if shard and size + value.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = np.ascontiguousarray(value)
        size += value.nbytes
    if shard:
        yield shard
