"""Correctness of every kernel backend that runs natively here, at sizes the CPU tests cannot reach.

For each backend native to this platform (interpreted Pallas on CPU, at small sizes) it compares
forward values and every gradient with the ``xla`` reference, computed in float32 from the same
inputs, and reports the largest error relative to the reference's largest magnitude. Needs no
pytest, so it runs on a bare accelerator machine with ``PYTHONPATH=.``.

    python bench/gpu_checks.py     # prints a table, writes bench/results/kernel-checks-<device>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np

import mlsys_jax  # noqa: F401
from mlsys_jax.kernels import cross_entropy, norms
from mlsys_jax.kernels.attention import FLASH_ATTENTION as ATTENTION
from mlsys_jax.kernels.attention import flash_attention
from mlsys_jax.kernels.dispatch import KernelUnavailable, current_platform
from mlsys_jax.kernels.paged_attention import PAGED_ATTENTION, paged_attention, quantize_blocks

TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2, "float16": 1e-2}


@dataclasses.dataclass
class Check:
    kernel: str
    backend: str
    case: str
    dtype: str
    worst: float | None
    passed: bool
    note: str = ""


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


def compare(
    kernel: str, backend: str, case: str, dtype, fn: Callable, ref: Callable, args: tuple, argnums: tuple[int, ...]
) -> Check:
    """Forward and vjp (random cotangent) of ``fn`` against ``ref`` evaluated on fp32 copies."""
    name = jnp.dtype(dtype).name
    try:
        out, vjp = jax.vjp(lambda *d: fn(*d, *args[len(argnums) :]), *args[: len(argnums)])
        ct = jax.random.normal(jax.random.key(9), out.shape, jnp.float32).astype(out.dtype)
        grads = vjp(ct)
        up = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
        want, vjp_ref = jax.vjp(lambda *d: ref(*d, *up[len(argnums) :]), *up[: len(argnums)])
        grads_ref = vjp_ref(ct.astype(jnp.float32))
        worst = max([rel_error(out, want)] + [rel_error(g, r) for g, r in zip(grads, grads_ref)])
        return Check(kernel, backend, case, name, worst, worst <= TOLERANCE[name])
    except KernelUnavailable as err:  # a backend that refuses these arguments says why
        return Check(kernel, backend, case, name, None, True, f"refused: {str(err)[:200]}")
    except Exception as err:  # noqa: BLE001 - one failing backend is reported, the rest still run
        return Check(kernel, backend, case, name, None, False, f"{type(err).__name__}: {str(err)[:200]}")


def backends(registry, platform: str) -> list[str]:
    out = []
    for name, b in registry.backends.items():
        if name == "xla":
            continue
        if platform in b.platforms or (platform == "cpu" and b.interpretable):
            out.append(name)
    return out


def attention_checks(platform: str, big: bool) -> list[Check]:
    b, s, h, kv, d = (2, 1000, 8, 2, 128) if big else (1, 40, 4, 2, 64)
    cases = [
        ("causal", {"causal": True}),
        ("full", {"causal": False}),
        ("causal window", {"causal": True, "sliding_window": s // 4}),
        ("segments", {"causal": True, "segment_ids": jnp.repeat(jnp.arange(4), -(-s // 4))[:s][None].repeat(b, 0)}),
    ]
    out = []
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, s, h, d), dtype)
        k = jax.random.normal(keys[1], (b, s, kv, d), dtype)
        v = jax.random.normal(keys[2], (b, s, kv, d), dtype)
        for backend in backends(ATTENTION, platform):
            for label, kw in cases:
                fn = lambda q, k, v, kw=kw, n=backend: flash_attention(q, k, v, implementation=n, **kw)
                ref = lambda q, k, v, kw=kw: flash_attention(q, k, v, implementation="xla", **kw)
                out.append(
                    compare(
                        "attention", backend, f"B{b} S{s} H{h}/{kv} D{d} {label}", dtype, fn, ref, (q, k, v), (0, 1, 2)
                    )
                )
            out += decode_checks(backend, q, k, v)
            out += head_dim_checks(backend, dtype, (b, s, h, kv))
    return out


def decode_checks(backend: str, q, k, v) -> list[Check]:
    """Chunks of queries at per-row offsets against keys cut at per-row lengths, and one decoded
    token per row: what prefill and decoding against a cache ask of a kernel."""
    b, s = q.shape[:2]
    out = []
    for chunk in (16, 1):
        offsets = jnp.array([s - chunk - 3 * i for i in range(b)], jnp.int32)
        lengths = offsets + chunk
        kw = {"causal": True, "q_offset": offsets, "kv_lengths": lengths}
        fn = lambda q, k, v, kw=kw, n=backend: flash_attention(q, k, v, implementation=n, **kw)
        ref = lambda q, k, v, kw=kw: flash_attention(q, k, v, implementation="xla", **kw)
        out.append(
            compare(
                "attention",
                backend,
                f"B{b} {chunk} queries at offsets vs S{s} cache",
                q.dtype,
                fn,
                ref,
                (q[:, :chunk], k, v),
                (0, 1, 2),
            )
        )
    return out


def head_dim_checks(backend: str, dtype, shape: tuple[int, int, int, int]) -> list[Check]:
    """head_dims off the power-of-two tiles (80, 96), causal."""
    b, s, h, kv = shape
    out = []
    for d in (80, 96):
        keys = jax.random.split(jax.random.key(d), 3)
        q = jax.random.normal(keys[0], (b, s, h, d), dtype)
        k = jax.random.normal(keys[1], (b, s, kv, d), dtype)
        v = jax.random.normal(keys[2], (b, s, kv, d), dtype)
        fn = lambda q, k, v, n=backend: flash_attention(q, k, v, causal=True, implementation=n)
        ref = lambda q, k, v: flash_attention(q, k, v, causal=True, implementation="xla")
        out.append(
            compare("attention", backend, f"B{b} S{s} H{h}/{kv} D{d} causal", dtype, fn, ref, (q, k, v), (0, 1, 2))
        )
    return out


def norm_checks(platform: str, big: bool) -> list[Check]:
    n, d = (4099, 4096) if big else (37, 128)
    out = []
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.random.normal(jax.random.key(1), (n, d), dtype)
        w = (1 + 0.1 * jax.random.normal(jax.random.key(2), (d,))).astype(dtype)
        for backend in backends(norms.RMS_NORM, platform):
            out.append(
                compare(
                    "rms_norm",
                    backend,
                    f"{n}x{d}",
                    dtype,
                    lambda x, w, n_=backend: norms.rms_norm(x, w, implementation=n_),
                    lambda x, w: norms.rms_norm(x, w, implementation="xla"),
                    (x, w),
                    (0, 1),
                )
            )
    return out


def loss_checks(platform: str, big: bool) -> list[Check]:
    t, d, v = (4101, 1024, 32007) if big else (50, 64, 300)
    out = []
    for dtype in (jnp.bfloat16, jnp.float32):
        h = jax.random.normal(jax.random.key(3), (t, d), dtype)
        w = (jax.random.normal(jax.random.key(4), (d, v)) * d**-0.5).astype(dtype)
        y = jax.random.randint(jax.random.key(5), (t,), 0, v).at[::7].set(-100)
        for backend in backends(cross_entropy.LINEAR_CROSS_ENTROPY, platform):
            out.append(
                compare(
                    "linear_cross_entropy",
                    backend,
                    f"T{t} D{d} V{v} z=1e-4",
                    dtype,
                    lambda h, w, y, n_=backend: cross_entropy.linear_cross_entropy(
                        h, w, y, z_loss=1e-4, implementation=n_
                    ),
                    lambda h, w, y: cross_entropy.linear_cross_entropy(h, w, y, z_loss=1e-4, implementation="xla"),
                    (h, w, y),
                    (0, 1),
                )
            )
    return out


def paged_attention_checks(platform: str, big: bool) -> list[Check]:
    """Each paged backend against the reference: decode and a chunk over shuffled blocks, GQA, with
    pools in the compute dtype and int8 ones (there the forward and the gradient w.r.t. q)."""
    b, h, kv, d, bs, longest = (8, 32, 8, 128, 16, 2000) if big else (2, 4, 2, 32, 16, 40)
    max_blocks = -(-longest // bs)
    num_blocks = b * max_blocks + 1
    lengths = jnp.asarray(np.linspace(1, longest, b).astype(np.int32))
    tables = jnp.asarray(
        np.random.default_rng(0).permutation(np.arange(1, num_blocks))[: b * max_blocks].reshape(b, max_blocks)
    )
    out = []
    for dtype in (jnp.bfloat16, jnp.float32):
        keys = jax.random.split(jax.random.key(1), 3)
        k_pages = jax.random.normal(keys[1], (num_blocks, bs, kv, d), dtype)
        v_pages = jax.random.normal(keys[2], (num_blocks, bs, kv, d), dtype)
        for q_len in (1, 8):
            q = jax.random.normal(keys[0], (b, q_len, h, d), dtype)
            for backend in backends(PAGED_ATTENTION, platform):
                fn = lambda q, k, v, t, n, name=backend: paged_attention(q, k, v, t, n, implementation=name)
                ref = lambda q, k, v, t, n: paged_attention(q, k, v, t, n, implementation="xla")
                case = f"B{b} q{q_len} H{h}/{kv} D{d} block{bs} len<={longest}"
                out.append(
                    compare(
                        "paged_attention",
                        backend,
                        case,
                        dtype,
                        fn,
                        ref,
                        (q, k_pages, v_pages, tables, lengths),
                        (0, 1, 2),
                    )
                )
                out.append(int8_check(backend, case, q, k_pages, v_pages, tables, lengths))
    return out


def int8_check(backend: str, case: str, q, k_pages, v_pages, tables, lengths) -> Check:
    """``backend`` on int8 pools (each block and head on its own scale) against the reference on
    the same int8 pools: both widen a block identically, so they differ only as float pools do."""
    k8, v8 = quantize_blocks(k_pages), quantize_blocks(v_pages)
    fn = lambda q, k, v, t, n, name=backend: paged_attention(q, k, v, t, n, implementation=name)
    ref = lambda q, k, v, t, n: paged_attention(q, k, v, t, n, implementation="xla")
    args = (q, k8, v8, tables, lengths)
    return compare("paged_attention", backend, f"{case} int8 pools", q.dtype, fn, ref, args, (0,))


def main(argv: list[str] | None = None) -> list[Check]:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    platform = current_platform()
    big = platform != "cpu"
    checks = attention_checks(platform, big) + paged_attention_checks(platform, big)
    checks += norm_checks(platform, big) + loss_checks(platform, big)
    print(f"## kernel checks on {jax.devices()[0].device_kind} (jax {jax.__version__})\n")
    print("| kernel | backend | case | dtype | worst rel. error | ok | note |\n|---|---|---|---|---|---|---|")
    for c in checks:
        worst = "not measured" if c.worst is None else f"{c.worst:.2e}"
        print(
            f"| {c.kernel} | {c.backend} | {c.case} | {c.dtype} | {worst} | {'yes' if c.passed else 'NO'} | {c.note} |"
        )
    slug = re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernel-checks-{slug}.json"
    path.write_text(
        json.dumps(
            {
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "checks": [dataclasses.asdict(c) for c in checks],
            },
            indent=1,
        )
    )
    print(f"\nwrote {path}; {sum(c.passed for c in checks)}/{len(checks)} passed")
    return checks


if __name__ == "__main__":
    sys.exit(0 if all(c.passed for c in main()) else 1)
