"""Reading a Hugging Face checkpoint into a sharded plan: sliced reads against the whole-tensor
load a hand-rolled script does.

A random Llama-family folder is written once (the ``125m`` shape with an untied head, ~134M
parameters, bfloat16 in ~100 MB shards) and read into ``Plan(make_mesh({"fsdp": 4, "tensor": 2}),
rules("fsdp_tp"))`` in float32, each method in a fresh process so its peak RSS is its own:

- ``ours``: ``hf.open_checkpoint`` + ``hf.load_params``; each device's callback reads only its
  box of the memory-mapped shards.
- ``naive``: ``safetensors.numpy.load_file`` of every shard (whole tensors on the host), our
  layout through the name mappings (layers stacked with ``np.stack``), ``jax.device_put`` per
  parameter into its sharding: what a hand-rolled import script does.
- ``ours, 2 proc``: ``ours`` in a job of two processes x 4 devices joined over gloo (same mesh and
  plan); each process reads the boxes of its own devices.

Reported per process (medians of REPEATS fresh runs): seconds from folder to arrays ready, bytes
read from the files, and the peak RSS increase over the RSS right after imports and device setup
(the kernel's high-water mark reset at that point, else ``ru_maxrss``; it also counts the file
pages a read maps in) together with the peak anonymous RSS (sampled from /proc/self/status: the
memory the process allocated). All 8 devices are simulated on one CPU host, so the device arrays
themselves are host memory and are part of both figures; the file was just written, so reads come
from the page cache and the seconds are memory copies, not disk.

Run from the repository root: ``python bench/hf_import.py`` (writes bench/results/hf_import.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESET = "125m"
OVERRIDES: dict[str, Any] = {"tie_embeddings": False, "dtype": "float32"}
FILE_DTYPE = "bfloat16"
MAX_SHARD_BYTES = 100 * 10**6
SCALE = 0.02
MESH = {"fsdp": 4, "tensor": 2}
STRATEGY = "fsdp_tp"
DEVICES = 8
REPEATS = 3  # fresh runs of each method; figures are their medians
CHECKED = ("final_norm", "layers/wk")  # parameters whose shards are compared with the file's values
MB = 10**6
MACHINE_NOTE = (
    "8 simulated CPU devices on one 2-core host: every device's memory is host memory, so RSS counts "
    "the device arrays too; what the sliced read saves is the whole-tensor staging copy, and across "
    "processes the bytes each reads"
)


# --- the checkpoint ------------------------------------------------------------------------------


def config() -> Any:
    from mlsys_jax.models import get_config

    return get_config(PRESET, **OVERRIDES)


def random_layer(path: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
    """Parameter ``path`` (one layer of it when ``layer`` is given), float32 with scale SCALE,
    seeded by the path and layer so whole and per-layer fetches agree."""
    rng = np.random.default_rng([zlib.crc32(path.encode()), 0 if layer is None else layer + 1])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(SCALE)


def make_folder(out: Path) -> dict[str, Any]:
    """Write a random HF folder of the bench's shape to ``out``; what was written."""
    from mlsys_jax.models import hf, llama
    from mlsys_jax.params import spec_leaves

    cfg = config()
    shapes = {path: tuple(spec.shape) for path, spec in spec_leaves(llama.param_specs(cfg))}
    layered = {path for path in shapes if path.startswith("layers/")}

    def fetch(path: str, layer: int | None = None) -> np.ndarray:
        shape = shapes[path]
        if path not in layered:
            return random_layer(path, None, shape)
        if layer is not None:  # the exporter asked for one layer of a stacked parameter
            return random_layer(path, layer, shape[1:])
        return np.stack([random_layer(path, i, shape[1:]) for i in range(shape[0])])

    t0 = time.perf_counter()
    files = hf.export_folder(cfg, fetch, out, dtype=FILE_DTYPE, max_shard_bytes=MAX_SHARD_BYTES)
    shards = [p for p in files if p.suffix == ".safetensors"]
    return {
        "params": int(sum(np.prod(s) for s in shapes.values())),
        "file_bytes": int(sum(p.stat().st_size for p in shards)),
        "shards": len(shards),
        "write_s": round(time.perf_counter() - t0, 2),
    }


# --- measuring a process -------------------------------------------------------------------------


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 where there is none, as off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Memory:
    """Peak RSS and peak anonymous RSS since ``start``, over the RSS at ``start``.

    Peak RSS is the kernel's high-water mark (``VmHWM``), reset at ``start`` through
    /proc/self/clear_refs so an earlier peak (imports, backend start) does not hide this one;
    where that reset is refused it is ``ru_maxrss``, which such a peak can hide. Peak anonymous RSS
    is sampled every 5 ms (file pages mapped by the reads are not in it)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.peak_source = "VmHWM"
        except OSError:
            self.peak_source = "ru_maxrss"
        self.rss0 = status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.anon0 = status_kib("RssAnon")
        self.file0 = status_kib("RssFile")
        self.rss_peak, self.anon_peak = self.rss0, self.anon0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        self.rss_peak = max(self.rss_peak, status_kib("VmRSS"))
        self.anon_peak = max(self.anon_peak, status_kib("RssAnon"))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(0.005)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._poll()
        if self.peak_source == "VmHWM":
            peak = max(status_kib("VmHWM"), self.rss_peak)
        else:
            peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, self.rss_peak)
        return {
            "peak_rss_increase": (peak - self.rss0) * 1024,
            "peak_anon_increase": (self.anon_peak - self.anon0) * 1024,
            "file_rss_increase": (status_kib("RssFile") - self.file0) * 1024,
            "peak_source": self.peak_source,
        }


def setup(devices: int, job: tuple[int, int] | None) -> Any:
    """Simulated devices (joining the job when given), the backend started, and the plan."""
    from mlsys_jax import distributed
    from mlsys_jax.mesh import simulate_cpu_devices

    simulate_cpu_devices(devices, check=job is None)
    if job is not None:
        port, process = job
        distributed.join(None, f"localhost:{port}", 2, process)
    import jax
    import safetensors.numpy  # noqa: F401 - imported before the baseline, as every method needs it

    from mlsys_jax.mesh import make_mesh
    from mlsys_jax.models import hf, llama  # noqa: F401
    from mlsys_jax.parallel import Plan, rules

    jax.devices()
    return Plan(make_mesh(MESH), rules(STRATEGY))


def local_bytes(params: Any) -> int:
    """Bytes of every array shard this process's devices hold (replicated copies included)."""
    import jax

    return int(sum(s.data.nbytes for a in jax.tree_util.tree_leaves(params) for s in a.addressable_shards))


def expected(folder: Path, cfg: Any, path: str) -> np.ndarray:
    """Our parameter ``path`` in our layout, from whole file tensors (for the check only)."""
    from safetensors import safe_open

    from mlsys_jax.models.hf.checkpoint import by_path
    from mlsys_jax.models.hf.files import SafetensorsFolder

    m = by_path(cfg)[path]
    files = SafetensorsFolder(folder).files

    def tensor(name: str) -> np.ndarray:
        with safe_open(str(files[name]), framework="numpy") as f:
            return f.get_tensor(name)

    whole = np.stack([m.to_ours(tensor(m.file_name(i))) for i in range(cfg.n_layers)]) if m.layered else None
    return (whole if whole is not None else m.to_ours(tensor(m.name))).astype(np.float32)


def check(folder: Path, cfg: Any, params: Any, specs: Any) -> list[str]:
    """Compare the CHECKED parameters' local shards with the file's values; fail loudly."""
    import jax

    from mlsys_jax.params import spec_leaves

    arrays = dict(zip([p for p, _ in spec_leaves(specs)], jax.tree_util.tree_leaves(params)))
    for path in CHECKED:
        want = expected(folder, cfg, path)
        for shard in arrays[path].addressable_shards:
            got = np.asarray(shard.data)
            if got.shape != want[shard.index].shape or not np.array_equal(got, want[shard.index]):
                raise AssertionError(
                    f"{path}: the shard at {shard.index} on {shard.device} differs from the file's values"
                )
    return list(CHECKED)


def ours(folder: Path, plan: Any) -> dict[str, Any]:
    import jax

    from mlsys_jax.models import hf, llama

    mem = Memory()
    t0 = time.perf_counter()
    ckpt = hf.open_checkpoint(folder, dtype="float32")
    model = llama.language_model(ckpt.config)
    params = hf.load_params(ckpt, model.specs, plan.param_shardings(model.specs))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "bytes_read": ckpt.tensors.reads.nbytes, **mem.stop()}
    # The shards stay mapped while ckpt lives, so the growth of file-backed RSS is the pages the
    # reads touched: what a cold read would fetch from disk (a box's rows share pages).
    out["file_pages_touched"] = out["file_rss_increase"]
    out["local_array_bytes"] = local_bytes(params)
    out["largest_read_fraction"] = max(
        float(np.prod([s.stop - s.start for s in box]) / np.prod(ckpt.tensors.shapes[name]))
        for name, box in ckpt.tensors.reads.boxes
    )
    out["checked"] = check(folder, ckpt.config, params, model.specs)
    return out


def naive(folder: Path, plan: Any) -> dict[str, Any]:
    import jax
    from safetensors.numpy import load_file

    from mlsys_jax.models import hf, llama
    from mlsys_jax.models.hf.names import mappings
    from mlsys_jax.params import spec_leaves

    mem = Memory()
    t0 = time.perf_counter()
    cfg = hf.from_hf(hf.read_config(folder), dtype="float32")
    specs = llama.param_specs(cfg)
    shards = sorted(folder.glob("*.safetensors"))
    whole: dict[str, np.ndarray] = {}
    for path in shards:
        whole.update(load_file(str(path)))
    table = {"/".join(m.path): m for m in mappings(cfg)}
    arrays = []
    for (path, spec), sharding in zip(spec_leaves(specs), jax.tree_util.tree_leaves(plan.param_shardings(specs))):
        m = table[path]
        if m.layered:
            host = np.stack([m.to_ours(whole[m.file_name(i)]) for i in range(cfg.n_layers)])
        else:
            host = m.to_ours(whole[m.name])
        arrays.append(jax.device_put(host.astype(spec.dtype), sharding))
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - t0
    file_bytes = int(sum(p.stat().st_size for p in shards))
    out = {"seconds": seconds, "bytes_read": file_bytes, "file_pages_touched": file_bytes, **mem.stop()}
    out["local_array_bytes"] = local_bytes(arrays)
    return out


def worker(args: argparse.Namespace) -> None:
    job = None if args.port is None else (args.port, args.process)
    plan = setup(DEVICES if job is None else DEVICES // 2, job)
    result = {"ours": ours, "naive": naive}[args.worker](Path(args.folder), plan)
    import jax

    result["process"] = jax.process_index()
    result["local_devices"] = jax.local_device_count()
    Path(args.out).write_text(json.dumps(result) + "\n")


# --- the bench -----------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONUNBUFFERED"] = "1"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(method: str, folder: Path, tmp: Path, processes: int) -> list[dict[str, Any]]:
    """Start ``processes`` workers of ``method`` at once; their reports."""
    port = free_port() if processes > 1 else None
    outs = [tmp / f"{method}-{processes}-{i}.json" for i in range(processes)]
    for out in outs:
        out.unlink(missing_ok=True)
    procs = []
    for i, out in enumerate(outs):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, str(folder), str(out)]
        if port is not None:
            cmd += ["--port", str(port), "--process", str(i)]
        procs.append(subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    failures = []
    for i, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            failures.append(f"{method} process {i} exited {p.returncode}:\n{err[-3000:]}")
    if failures:
        raise RuntimeError("\n".join(failures))
    return [json.loads(out.read_text()) for out in outs]


def worst(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures: its slowest process's seconds, the largest per-process read and memory."""
    return {
        "seconds": max(r["seconds"] for r in reports),
        "bytes_read_per_process": max(r["bytes_read"] for r in reports),
        "file_pages_touched_per_process": max(r["file_pages_touched"] for r in reports),
        "peak_rss_increase_per_process": max(r["peak_rss_increase"] for r in reports),
        "peak_anon_increase_per_process": max(r["peak_anon_increase"] for r in reports),
        "local_array_bytes_per_process": max(r["local_array_bytes"] for r in reports),
    }


def measure(name: str, method: str, folder: Path, tmp: Path, processes: int) -> dict[str, Any]:
    """REPEATS fresh runs of a method; each figure is the median over them."""
    runs = [run_workers(method, folder, tmp, processes) for _ in range(REPEATS)]
    per_run = [worst(reports) for reports in runs]
    row: dict[str, Any] = {"method": name, "processes": processes, "repeats": REPEATS}
    for key in per_run[0]:
        row[key] = float(np.median([r[key] for r in per_run]))
        if key != "seconds":
            row[key] = int(row[key])
    row["seconds_each_run"] = [round(r["seconds"], 3) for r in per_run]
    row["runs"] = runs
    return row


def main() -> dict[str, Any]:
    import jax
    from rich.console import Console
    from rich.table import Table

    t0 = time.perf_counter()
    cfg = config()
    with tempfile.TemporaryDirectory(prefix="hf_import_") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "model"
        written = make_folder(folder)
        rows = [
            measure("ours (sliced reads)", "ours", folder, tmp, 1),
            measure("naive (load_file, device_put)", "naive", folder, tmp, 1),
            measure("ours, 2 proc x 4 dev (gloo)", "ours", folder, tmp, 2),
        ]
    base = rows[1]
    for r in rows:
        r["time_ratio"] = round(r["seconds"] / base["seconds"], 3)
        r["rss_ratio"] = round(r["peak_rss_increase_per_process"] / base["peak_rss_increase_per_process"], 3)
        r["anon_ratio"] = round(r["peak_anon_increase_per_process"] / base["peak_anon_increase_per_process"], 3)
        r["bytes_ratio"] = round(r["bytes_read_per_process"] / base["bytes_read_per_process"], 3)
        r["pages_ratio"] = round(r["file_pages_touched_per_process"] / base["file_pages_touched_per_process"], 3)

    title = (
        f"HF import of {PRESET} (untied, {written['params'] / 1e6:.0f}M params, {FILE_DTYPE} file "
        f"{written['file_bytes'] / MB:.0f} MB in {written['shards']} shards) into {STRATEGY} "
        f"fsdp=4 x tensor=2, float32"
    )
    table = Table(title=title)
    heads = (
        "method",
        "s",
        "read MB/proc",
        "pages MB/proc",
        "peak RSS +MB",
        "peak anon +MB",
        "arrays MB",
        "time x",
        "RSS x",
    )
    for name in (*heads, "anon x", "bytes x", "pages x"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['seconds']:.2f}",
            f"{r['bytes_read_per_process'] / MB:.0f}",
            f"{r['file_pages_touched_per_process'] / MB:.0f}",
            f"{r['peak_rss_increase_per_process'] / MB:.0f}",
            f"{r['peak_anon_increase_per_process'] / MB:.0f}",
            f"{r['local_array_bytes_per_process'] / MB:.0f}",
            f"{r['time_ratio']:.2f}",
            f"{r['rss_ratio']:.2f}",
            f"{r['anon_ratio']:.2f}",
            f"{r['bytes_ratio']:.2f}",
            f"{r['pages_ratio']:.2f}",
        )
    note = (
        f"Per process, medians of {REPEATS} fresh runs; the 2-process row takes the worse process of each run. "
        "Ratios are against the naive load. 'read MB' is the bytes copied out of the files; 'pages MB' the "
        "file pages those reads touched (ours: growth of file-backed RSS, the shards staying mapped; naive: "
        "the whole file, which load_file reads), what a cold read would fetch from disk. 'arrays MB' is the device arrays a process holds, which on "
        "simulated CPU devices are host memory inside both memory figures, so they dominate them; the "
        "difference between methods is the host staging (the naive load's whole bf16 tensors plus a float32 "
        "copy of the parameter being placed, against ours' per-box copies). 'peak RSS' is the high-water RSS "
        "and also counts the file pages the reads map in (clean page cache, reclaimable); 'peak anon' "
        "(sampled every 5 ms) counts only memory the process allocated. The file was just written, so reads "
        f"come from the page cache and the seconds are copies, not disk. {MACHINE_NOTE}."
    )
    console = Console(width=160)
    console.print(table)
    console.print(note)
    result = {
        "benchmark": "hf_import",
        "jax": jax.__version__,
        "machine": MACHINE_NOTE,
        "note": note,
        "model": {
            "preset": PRESET,
            **{k: v for k, v in OVERRIDES.items() if k != "dtype"},
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads,
            "d_ff": cfg.d_ff,
            "params": written["params"],
        },
        "file": {
            "dtype": FILE_DTYPE,
            "bytes": written["file_bytes"],
            "shards": written["shards"],
            "max_shard_bytes": MAX_SHARD_BYTES,
        },
        "plan": {"mesh": MESH, "rules": STRATEGY, "param_dtype": "float32", "devices": DEVICES},
        "rows": rows,
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    out = ROOT / "bench" / "results" / "hf_import.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} in {result['runtime_s']:.0f}s")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--worker", choices=("ours", "naive"), help="run one method in this process (internal)")
    parser.add_argument("folder", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--port", type=int)
    parser.add_argument("--process", type=int, default=0)
    parsed = parser.parse_args()
    if parsed.worker:
        worker(parsed)
    else:
        main()
