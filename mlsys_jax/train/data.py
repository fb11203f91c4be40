"""Text data: a corpus of files, and a grain pipeline of global batches.

The default corpus is the ``.py`` files of the running Python's standard library: real text on
every machine with no download. The pipeline is deterministic and checkpointable: its state is
how many batches it has handed out, and each process reads only the rows its devices hold.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from mlsys_jax.tokenizer import ByteTokenizer, Tokenizer


class DataError(ValueError):
    """Data that cannot feed the run as configured."""


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (installed packages left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, and every non-hidden file under named folders, sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            raise DataError(
                f"--data {str(raw)!r} is neither a file nor a folder. Fix: point it at text files or a folder of them."
            )
    if not out:
        raise DataError(
            f"--data {[str(p) for p in paths]} holds no files. Fix: point it at text files or a folder of them."
        )
    return out


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams for training and validation (documents joined by EOS), split by file."""

    train: np.ndarray
    val: np.ndarray
    train_files: int
    val_files: int


def load_corpus(
    paths: Sequence[str | Path] | None = None, *, val_fraction: float = 0.05, tokenizer: Tokenizer | None = None
) -> Corpus:
    """Read and tokenize the corpus. A file goes to validation when a hash of its name says so,
    so the split does not move when files are added; a single file is split by position."""
    tok = tokenizer or ByteTokenizer()
    files = stdlib_files() if paths is None else text_files(paths)
    pairs = [(f, f.read_bytes()) for f in files]
    pairs = [(f, d) for f, d in pairs if d and b"\x00" not in d[:4096]]  # skip binary files
    if not pairs:
        raise DataError("the corpus holds no text files. Fix: point --data at text files.")
    if len(pairs) == 1:
        only = pairs[0][1]
        cut = int(len(only) * (1 - val_fraction))
        train_docs, val_docs = [only[:cut]], [only[cut:]]
    else:
        root = os.path.commonpath([str(f) for f, _ in pairs])
        keys = [os.path.relpath(f, root).encode() for f, _ in pairs]
        is_val = [zlib.crc32(k) % 10_000 < val_fraction * 10_000 for k in keys]
        if not any(is_val):
            is_val[-1] = True
        if all(is_val):
            is_val[0] = False
        train_docs = [d for (_, d), v in zip(pairs, is_val) if not v]
        val_docs = [d for (_, d), v in zip(pairs, is_val) if v]

    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32

    def stream(parts: list[bytes]) -> np.ndarray:
        eos = np.array([tok.EOS], dtype)
        return np.concatenate([x for d in parts for x in (tok.encode(d), eos)])

    return Corpus(stream(train_docs), stream(val_docs), len(train_docs), len(val_docs))


def num_windows(stream: np.ndarray, seq_len: int) -> int:
    """How many (seq_len + 1)-token windows, at stride seq_len, the stream holds."""
    return max(0, (len(stream) - 1) // seq_len)


@dataclasses.dataclass(frozen=True)
class WindowRows:
    """Turn a global batch of window ids into this process's rows of inputs and targets."""

    stream: np.ndarray
    seq_len: int
    lo: int
    hi: int

    def __call__(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        local = np.asarray(ids[self.lo : self.hi], dtype=np.int64)
        offsets = local[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        window = self.stream[offsets].astype(np.int32)
        return {
            "inputs": window[:, :-1],
            "targets": window[:, 1:],
            "mask": np.ones((len(local), self.seq_len), dtype=bool),
            "index": np.asarray(ids, dtype=np.int64),
        }


def train_dataset(
    stream: np.ndarray, *, seq_len: int, global_batch: int, seed: int, rows: tuple[int, int] | None = None
) -> grain.MapDataset:
    """Endless global batches of shuffled windows (a new order each epoch); each element holds
    only ``rows`` of the batch (this process's share) plus the global window ids."""
    n = num_windows(stream, seq_len)
    if n < global_batch:
        raise DataError(
            f"the training text holds {n} windows of {seq_len + 1} tokens, fewer than one batch "
            f"of {global_batch}. Fix: add text, or lower --batch / --seq."
        )
    lo, hi = rows if rows is not None else (0, global_batch)
    return (
        grain.MapDataset.range(n)
        .shuffle(seed=seed)
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .map(WindowRows(stream, seq_len, lo, hi))
    )


def iterator(dataset: grain.MapDataset, state: dict[str, Any] | None = None) -> Any:
    """A checkpointable iterator (``get_state()`` / ``set_state()``) with a small prefetch."""
    it = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    if state is not None:
        it.set_state(state)
    return it


def val_batches(
    stream: np.ndarray, *, seq_len: int, global_batch: int, num_batches: int, rows: tuple[int, int] | None = None
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` batches of validation windows, in order (fewer if the text is
    short; none if it holds less than one batch)."""
    n = min(num_batches, num_windows(stream, seq_len) // global_batch)
    lo, hi = rows if rows is not None else (0, global_batch)
    take = WindowRows(stream, seq_len, lo, hi)
    return [take(np.arange(b * global_batch, (b + 1) * global_batch)) for b in range(n)]


def local_rows(sharding: jax.sharding.Sharding, global_batch: int, seq_len: int) -> tuple[int, int]:
    """The contiguous block of batch rows this process's devices hold under ``sharding``."""
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map((global_batch, seq_len)).values() if idx]
    spans = {(r.start or 0, r.stop if r.stop is not None else global_batch) for r in rows}
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    covered = sorted(spans)
    pos = lo
    for start, stop in covered:
        if start > pos:
            raise DataError(
                f"this process holds batch rows {covered}, which are not one block; lay out the "
                "mesh so each process's devices are consecutive along the batch axes"
            )
        pos = max(pos, stop)
    return lo, hi


def to_global(
    batch: dict[str, np.ndarray], shardings: Mapping[str, jax.sharding.Sharding], global_batch: int
) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded for the train step."""
    out = {}
    for key, sharding in shardings.items():
        local = batch[key]
        out[key] = jax.make_array_from_process_local_data(sharding, local, (global_batch, *local.shape[1:]))
    return out


def batch_digest(batch: dict[str, np.ndarray]) -> int:
    """A checksum of the global window ids in a batch: equal digests, same examples."""
    return zlib.crc32(np.ascontiguousarray(batch["index"], dtype=np.int64).tobytes())
