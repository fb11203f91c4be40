"""Time block-size candidates of a kernel on this device and remember the winner.

Winners live in one JSON file keyed by device kind, operation, backend, shape class and dtype;
kernels called with ``blocks=None`` read it (``cached_blocks``) before falling back to the
backend's defaults for the device kind. A shape class rounds every dimension up to a power of two, so one tuning
serves nearby shapes. The file is written atomically; a damaged file is reported, not trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from mlsys_jax.kernels.blocks import device_kind

CACHE_ENV = "MLSYS_JAX_AUTOTUNE_CACHE"


def cache_path() -> Path:
    """Where winners are kept: $MLSYS_JAX_AUTOTUNE_CACHE, else ~/.cache/mlsys_jax/autotune.json."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "mlsys_jax" / "autotune.json"


def shape_class(*arrays: Any) -> str:
    """Each array's shape with dims rounded up to powers of two, e.g. '1x64x8x64,1x64x4x64'."""

    def up(n: int) -> int:
        return 1 << max(0, (int(n) - 1).bit_length())

    return ",".join("x".join(str(up(d)) for d in a.shape) for a in arrays)


def cache_key(op: str, backend: str, *arrays: Any) -> str:
    dtype = arrays[0].dtype if arrays else "none"
    return f"{device_kind()}|{op}|{backend}|{shape_class(*arrays)}|{jax.numpy.dtype(dtype).name}"


_memo: dict[Path, tuple[float, dict]] = {}


def _read(path: Path) -> dict:
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return {}
    if path in _memo and _memo[path][0] == mtime:
        return _memo[path][1]
    try:
        data = json.loads(path.read_text())
        problem = None if isinstance(data, dict) else "not a JSON object"
    except (ValueError, OSError) as err:
        problem = err
    if problem is not None:
        warnings.warn(f"ignoring the autotune cache {path}: {problem}. Fix: delete it and tune again.")
        data = {}
    _memo[path] = (mtime, data)
    return data


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _memo.pop(path, None)


def cached_blocks(op: str, backend: str, kind: type, *arrays: Any, path: Path | None = None):
    """The tuned config of type ``kind`` for these arrays on this device, or None."""
    entry = _read(path or cache_path()).get(cache_key(op, backend, *arrays))
    if not entry:
        return None
    try:
        return kind(**entry["blocks"])
    except (TypeError, ValueError, KeyError):
        return None


def resolve_blocks(op: str, backend: Any, *arrays: Any) -> Any:
    """The config a kernel called with ``blocks=None`` uses: the tuned winner for this device,
    shape class and dtype, else the backend's default for the device kind. None for a backend
    without tiles (the references), which never reads the cache."""
    if backend.blocks is None:
        return None
    return cached_blocks(op, backend.name, backend.blocks, *arrays) or backend.default_blocks()


def default_blocks(registry: Any, backend: str, device: str | None = None) -> Any:
    """The default block config of an operation's backend on a device kind, e.g.
    ``default_blocks(FLASH_ATTENTION, "pallas_triton", "NVIDIA H200")``."""
    return registry.backends[backend].default_blocks(device)


@dataclasses.dataclass(frozen=True)
class Trial:
    blocks: Any
    seconds: float | None
    error: str | None = None


def time_call(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call (which also compiles)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def autotune(
    op: str,
    backend: str,
    run: Callable[[Any], Callable[[], Any]],
    candidates: Sequence[Any],
    *arrays: Any,
    repeats: int = 5,
    path: Path | None = None,
) -> tuple[Any, list[Trial]]:
    """Time ``run(blocks)()`` for each candidate config, cache the fastest, return it and all trials.

    ``arrays`` are the kernel's inputs that define the cache key (as ``flash_attention`` reads it).
    Candidates that fail to compile or run are recorded with their error and skipped.
    """
    trials = []
    for blocks in candidates:
        try:
            trials.append(Trial(blocks, time_call(run(blocks), repeats)))
        except Exception as err:  # noqa: BLE001 - a candidate the backend cannot lower is simply not a winner
            trials.append(Trial(blocks, None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
    timed = [t for t in trials if t.seconds is not None]
    if not timed:
        raise RuntimeError(f"autotune {op}/{backend}: every candidate failed: {[t.error for t in trials]}")
    best = min(timed, key=lambda t: t.seconds)
    path = path or cache_path()
    data = dict(_read(path))
    data[cache_key(op, backend, *arrays)] = {
        "blocks": dataclasses.asdict(best.blocks),
        "seconds": best.seconds,
        "tried": len(trials),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write(path, data)
    return best.blocks, trials
