"""Our kernels side by side with what a user would otherwise run, on the current device.

Attention in TFLOP/s (4*B*S*S*H*D, halved when causal; forward+backward counts 3.5x the forward),
against XLA, cuDNN (GPU) and the Pallas ops that ship inside jax; RMSNorm in GB/s against XLA and
jax's shipped Pallas rms_norm (with a copy as the bandwidth ceiling); the fused linear
cross-entropy in time and compiled peak memory against the unfused logits path. Ratios are taken
within one run. On CPU, Pallas runs only in interpret mode, so its timings there are not
measured; the XLA baselines and the loss's memory still are.

    python bench/kernels.py            # the issue's shapes on GPU/TPU, small shapes on CPU
    python bench/kernels.py --quick    # smaller shapes anywhere

Prints markdown tables and writes bench/results/kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp

import mlsys_jax  # noqa: F401  (mounts kernels/ as mlsys_jax.kernels from a source tree)
from mlsys_jax.kernels import cross_entropy, norms
from mlsys_jax.kernels.attention import FLASH_ATTENTION as ATTENTION
from mlsys_jax.kernels.attention import flash_attention
from mlsys_jax.kernels.autotune import time_call
from mlsys_jax.kernels.dispatch import KernelUnavailable, current_platform

RESULTS = ROOT / "bench" / "results"


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


@dataclasses.dataclass
class Row:
    kernel: str
    contender: str
    case: str
    metric: str
    value: float | None
    ms: float | None
    vs_xla: float | None = None
    vs_cudnn: float | None = None
    note: str = ""


def _measure(fn: Callable[[], Any], repeats: int) -> tuple[float | None, str]:
    try:
        return time_call(fn, repeats), ""
    except Exception as err:  # noqa: BLE001 - a contender that cannot run here is reported, not fatal
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def not_native(kernel: str, registry: Any, plat: str, case: str, metric: str) -> list[Row]:
    """Rows saying which of our backends could not be timed on this platform, and why."""
    return [
        Row(
            kernel,
            f"ours:{n}",
            case,
            metric,
            None,
            None,
            note=f"not measured: runs on {'/'.join(b.platforms)}"
            + (" (only interpreted here)" if b.interpretable and plat == "cpu" else ""),
        )
        for n, b in registry.backends.items()
        if plat not in b.platforms
    ]


# --- attention ------------------------------------------------------------------------------------


def attention_contenders(platform_name: str, dtype: Any) -> dict[str, tuple[Callable, bool]]:
    """name -> (attend(q, k, v, causal) in (B, S, H, D) layout, whether it has a backward)."""
    out: dict[str, tuple[Callable, bool]] = {}
    for name in ATTENTION.names():
        backend = ATTENTION.backends[name]
        if platform_name in backend.platforms:
            out[f"ours:{name}"] = (
                lambda q, k, v, causal, n=name: flash_attention(q, k, v, causal=causal, implementation=n),
                True,
            )
    if platform_name == "gpu":
        from jax.experimental.pallas.ops.gpu import attention as jax_mha

        out["jax:pallas_mha"] = (
            lambda q, k, v, causal: jax_mha.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal),
            True,
        )
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as jax_mgpu

            def mgpu(q, k, v, causal):
                cfg = jax_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
                return jax_mgpu.attention(q, k, v, cfg)

            out["jax:pallas_mosaic_gpu"] = (mgpu, True)
        except ImportError:
            pass
    if platform_name == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu

        def tpu(q, k, v, causal):
            t = lambda x: x.transpose(0, 2, 1, 3)
            return t(jax_tpu.flash_attention(t(q), t(k), t(v), causal=causal, sm_scale=q.shape[-1] ** -0.5))

        out["jax:pallas_tpu_flash"] = (tpu, True)
    return out


def bench_attention(shape: tuple[int, int, int, int], dtype: Any, repeats: int) -> list[Row]:
    b, s, h, d = shape
    plat = current_platform()
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, shape, dtype) for kk in keys)
    rows: list[Row] = []
    for causal in (True, False):
        flops = 4 * b * s * s * h * d * (0.5 if causal else 1.0)
        case = f"B{b} S{s} H{h} D{d} {jnp.dtype(dtype).name} {'causal' if causal else 'full'}"
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            results: dict[str, tuple[float | None, str]] = {}
            for name, (attend, has_bwd) in attention_contenders(plat, dtype).items():
                if mode == "fwd":
                    f = jax.jit(lambda q, k, v, a=attend, c=causal: a(q, k, v, c))
                else:
                    if not has_bwd:
                        continue
                    f = jax.jit(
                        jax.grad(
                            lambda q, k, v, a=attend, c=causal: jnp.vdot(
                                a(q, k, v, c).astype(jnp.float32), do.astype(jnp.float32)
                            ),
                            argnums=(0, 1, 2),
                        )
                    )
                results[name] = _measure(lambda f=f: f(q, k, v), repeats)
            xla = results.get("ours:xla", (None, ""))[0]
            cudnn = results.get("ours:cudnn", (None, ""))[0]
            for name, (sec, note) in results.items():
                tflops = None if sec is None else flops * mult / sec / 1e12
                rows.append(
                    Row(
                        "attention",
                        name,
                        f"{case} {mode}",
                        "TFLOP/s",
                        tflops,
                        None if sec is None else sec * 1e3,
                        None if sec is None or xla is None else xla / sec,
                        None if sec is None or cudnn is None else cudnn / sec,
                        note,
                    )
                )
    return rows + not_native("attention", ATTENTION, plat, f"B{b} S{s} H{h} D{d}", "TFLOP/s")


# --- RMSNorm -------------------------------------------------------------------------------------


def bench_rms_norm(rows_n: int, features: int, dtype: Any, repeats: int) -> list[Row]:
    plat = current_platform()
    x = jax.random.normal(jax.random.key(1), (rows_n, features), dtype)
    w = jnp.ones((features,), dtype)
    dy = jax.random.normal(jax.random.key(2), x.shape, dtype)
    nbytes = x.size * jnp.dtype(dtype).itemsize
    contenders: dict[str, Callable] = {}
    for name in norms.RMS_NORM.names():
        if plat in norms.RMS_NORM.backends[name].platforms:
            contenders[f"ours:{name}"] = lambda x, w, n=name: norms.rms_norm(x, w, implementation=n)
    if plat == "gpu":
        from jax.experimental.pallas.ops.gpu import rms_norm as jax_rms

        contenders["jax:pallas_rms_norm"] = lambda x, w: jax_rms.rms_norm(x, w, jnp.zeros_like(w))
    case = f"{rows_n}x{features} {jnp.dtype(dtype).name}"
    out: list[Row] = []
    copy = jax.jit(lambda x: x + 1)
    copy_s, note = _measure(lambda: copy(x), repeats)
    out.append(
        Row(
            "rms_norm",
            "copy (x+1)",
            f"{case} fwd",
            "GB/s",
            None if copy_s is None else 2 * nbytes / copy_s / 1e9,
            None if copy_s is None else copy_s * 1e3,
            note="bandwidth ceiling",
        )
    )
    # Bytes that must move: forward reads x, writes y; backward also reads x and dy, writes dx.
    for mode, moved in (("fwd", 2 * nbytes), ("fwd+bwd", 5 * nbytes)):
        results = {}
        for name, fn in contenders.items():
            if mode == "fwd":
                f = jax.jit(fn)
                results[name] = _measure(lambda f=f: f(x, w), repeats)
            else:
                g = jax.jit(lambda x, w, fn=fn: jax.vjp(fn, x, w)[1](dy))
                results[name] = _measure(lambda g=g: g(x, w), repeats)
        xla = results.get("ours:xla", (None, ""))[0]
        for name, (sec, note) in results.items():
            out.append(
                Row(
                    "rms_norm",
                    name,
                    f"{case} {mode}",
                    "GB/s",
                    None if sec is None else moved / sec / 1e9,
                    None if sec is None else sec * 1e3,
                    None if sec is None or xla is None else xla / sec,
                    note=note,
                )
            )
    return out + not_native("rms_norm", norms.RMS_NORM, plat, case, "GB/s")


# --- fused linear cross-entropy -----------------------------------------------------------------


def loss_peak_bytes(impl: str, tokens: int, d: int, vocab: int, dtype: Any) -> int:
    """Compiled temp + output bytes of value_and_grad of the summed loss (hidden, weight)."""
    h = jax.ShapeDtypeStruct((tokens, d), dtype)
    w = jax.ShapeDtypeStruct((d, vocab), dtype)
    y = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    f = jax.jit(
        jax.value_and_grad(
            lambda h, w, y: jnp.sum(cross_entropy.linear_cross_entropy(h, w, y, implementation=impl)), argnums=(0, 1)
        )
    )
    mem = f.lower(h, w, y).compile().memory_analysis()
    assert mem is not None
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes)


def bench_loss(tokens: int, d: int, vocab: int, dtype: Any, repeats: int) -> list[Row]:
    plat = current_platform()
    reg = cross_entropy.LINEAR_CROSS_ENTROPY
    h = jax.random.normal(jax.random.key(3), (tokens, d), dtype)
    w = (jax.random.normal(jax.random.key(4), (d, vocab), jnp.float32) * d**-0.5).astype(dtype)
    y = jax.random.randint(jax.random.key(5), (tokens,), 0, vocab)
    case = f"T{tokens} D{d} V{vocab} {jnp.dtype(dtype).name} fwd+bwd"
    names = [n for n in reg.names() if plat in reg.backends[n].platforms]
    timed, peak = {}, {}
    for name in names:
        f = jax.jit(
            jax.value_and_grad(
                lambda h, w, n=name: jnp.sum(cross_entropy.linear_cross_entropy(h, w, y, implementation=n)),
                argnums=(0, 1),
            )
        )
        timed[name] = _measure(lambda f=f: f(h, w), repeats)
        try:
            peak[name] = loss_peak_bytes(name, tokens, d, vocab, dtype)
        except Exception as err:  # noqa: BLE001 - a backend whose memory cannot be measured is reported
            peak[name] = None
            timed[name] = (timed[name][0], timed[name][1] or f"memory: {type(err).__name__}")
    xla_t, xla_m = timed.get("xla", (None, ""))[0], peak.get("xla")
    out = []
    for name in names:
        sec, note = timed[name]
        out.append(
            Row(
                "linear_cross_entropy",
                f"ours:{name}",
                case,
                "ms",
                None if sec is None else sec * 1e3,
                None if sec is None else sec * 1e3,
                None if sec is None or xla_t is None else xla_t / sec,
                note=note,
            )
        )
        if peak[name] is not None:
            ratio = None if not xla_m else peak[name] / xla_m
            out.append(
                Row(
                    "linear_cross_entropy",
                    f"ours:{name}",
                    case,
                    "peak MiB",
                    peak[name] / 2**20,
                    None,
                    note=f"peak/unfused = {ratio:.3f}" if ratio is not None else "",
                )
            )
    return out + not_native("linear_cross_entropy", reg, plat, case, "ms")


# --- report --------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2) -> str:
    return "not measured" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| kernel | contender | case | metric | value | ms | vs XLA | vs cuDNN | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = "—" if r.metric == "peak MiB" else fmt(r.ms, 3)
        lines.append(
            f"| {r.kernel} | {r.contender} | {r.case} | {r.metric} | {fmt(r.value)} | {ms} "
            f"| {fmt(r.vs_xla)}x | {fmt(r.vs_cudnn)}x | {r.note} |".replace("not measuredx", "—")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    plat = current_platform()
    big = plat in ("gpu", "tpu") and not args.quick
    if big:
        attn_shape, attn_dtype = (4, 4096, 16, 128), jnp.bfloat16
        norm_shape = (32768, 4096)
        loss_shape = (8192, 4096, 32768)
    else:
        attn_shape, attn_dtype = (1, 512, 4, 64), jnp.float32
        norm_shape = (4096, 1024)
        loss_shape = (1024, 256, 32768)
    rows = bench_attention(attn_shape, attn_dtype, args.repeats)
    if plat == "gpu" and big:  # fp16: where jax's Hopper kernel is compared in the issue
        rows += bench_attention(attn_shape, jnp.float16, args.repeats)
    rows += bench_rms_norm(*norm_shape, jnp.bfloat16, args.repeats)
    rows += bench_loss(*loss_shape, jnp.bfloat16, max(2, args.repeats // 3))
    table = markdown(rows)
    print(f"## kernels on {jax.devices()[0].device_kind} (jax {jax.__version__})\n")
    print(table)
    if plat == "cpu":
        print("\nPallas kernels run only interpreted on CPU: their speed here is not measured.")
    result = {
        "device": jax.devices()[0].device_kind,
        "platform": plat,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{device_slug()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    try:
        main()
    except KernelUnavailable as err:
        sys.exit(str(err))
