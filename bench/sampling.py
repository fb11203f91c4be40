"""Sampling speed of the demo model: a KV cache against re-running the whole sequence per token.

The demo's model (``llama:small``, bf16 compute) on the demo's plan (``cpu-8``: data=2, fsdp=2,
tensor=2 on 8 simulated devices) continues the demo's four prompts. Two samplers, each one
jitted program per shape, greedy so both produce the same tokens:

- ``cache``: ``mlsys_jax.serve.Generator``, prefill once, then one decode step per token;
- ``full rerun``: what a user writes without a cache (and what the demo did before): a
  fixed-length buffer, and for each new token the whole forward pass over it.

Each is timed after a first call that compiles, median of ``REPEATS`` runs; tokens/s counts the
new tokens of the real prompts. Writes bench/results/sampling-<device>.json and a PNG.

Run from the repository root: ``python bench/sampling.py``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)  # only the CPU backend reads this

import jax.numpy as jnp
import numpy as np

import mlsys_jax as mj
from mlsys_jax.models import base, build_model
from mlsys_jax.serve import Generator

MODEL = "llama:small"
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
STRATEGY = "dp_fsdp_tp"
PROMPTS = ("def ", "import ", "class ", "    return ")  # the demo's
NEW_TOKENS = (64, 256)
REPEATS = 3


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def full_rerun_sampler(model: base.LanguageModel, plan: mj.Plan, rows: int, length: int):
    """Greedy sampling without a cache: the whole (rows, length) buffer through the model for
    every new token, one jitted loop."""
    rep = plan.replicated()

    def run(params, buf, pos, steps):
        def body(_, carry):
            buf, pos = carry
            logits = base.forward(model, params, plan.constrain(buf, ("batch", "seq")), plan.layout)
            last = jnp.take_along_axis(logits, (pos - 1)[:, None, None], axis=1)[:, 0]
            nxt = jnp.argmax(last, axis=-1).astype(buf.dtype)
            return jnp.where(jnp.arange(length)[None, :] == pos[:, None], nxt[:, None], buf), pos + 1

        return jax.lax.fori_loop(0, steps, body, (buf, pos))[0]

    step = jax.jit(run, in_shardings=(None, rep, rep, rep), out_shardings=rep)

    def sample(params, prompts: list[np.ndarray], new_tokens: int) -> list[np.ndarray]:
        buf = np.zeros((rows, length), np.int32)
        pos = np.ones((rows,), np.int32)
        for i, p in enumerate(prompts):
            buf[i, : len(p)], pos[i] = p, len(p)
        out = np.asarray(step(params, buf, pos, new_tokens))
        return [out[i, len(p) : len(p) + new_tokens] for i, p in enumerate(prompts)]

    return sample


def timed(fn) -> tuple[float, float, Any]:
    """(seconds of the first call, which compiles; median seconds of the next ones; result)."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), result


def main() -> None:
    devices = jax.devices()[:8]
    plan = mj.Plan(mj.make_mesh(MESH, devices=devices), mj.rules(STRATEGY))
    model = build_model(MODEL)
    params = plan.init(model.specs, jax.random.PRNGKey(0))
    prompts = [np.frombuffer(p.encode(), np.uint8).astype(np.int32) for p in PROMPTS]
    generator = Generator(model, plan)
    rows = generator.rows(len(prompts))
    results = []
    for new_tokens in NEW_TOKENS:
        cache_first, cache_s, cached = timed(
            lambda n=new_tokens: generator.generate(params, prompts, new_tokens=n, temperature=0.0)
        )
        sample = full_rerun_sampler(model, plan, rows, max(len(p) for p in prompts) + new_tokens)
        full_first, full_s, rerun = timed(lambda s=sample, n=new_tokens: s(params, prompts, n))
        produced = len(prompts) * new_tokens
        agree = float(np.mean([np.mean(a == b) for a, b in zip(cached, rerun)]))
        row = {
            "new_tokens": new_tokens,
            "cache_seconds": cache_s,
            "full_rerun_seconds": full_s,
            "cache_first_call_seconds": cache_first,
            "full_rerun_first_call_seconds": full_first,
            "cache_tokens_per_s": produced / cache_s,
            "full_rerun_tokens_per_s": produced / full_s,
            "speedup": full_s / cache_s,
            "greedy_tokens_equal_fraction": agree,
        }
        results.append(row)
        print(
            f"{new_tokens:4d} new tokens: cache {row['cache_tokens_per_s']:8.1f} tok/s, full rerun "
            f"{row['full_rerun_tokens_per_s']:8.1f} tok/s, ratio {row['speedup']:.2f}x "
            f"(first calls {cache_first:.1f} s / {full_first:.1f} s; tokens equal {agree:.0%})",
            flush=True,
        )
    device = devices[0].device_kind
    out = {
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "device": device,
        "num_devices": len(devices),
        "model": MODEL,
        "mesh": MESH,
        "strategy": STRATEGY,
        "prompts": list(PROMPTS),
        "repeats": REPEATS,
        "results": results,
        "method": "greedy; each sampler is one jitted program per shape, timed after a first "
        "call that compiles, median of the repeats; tokens/s counts the real prompts' "
        "new tokens",
    }
    path = ROOT / "bench" / "results" / f"sampling-{slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print_table(results)
    print(f"wrote {path.relative_to(ROOT)}")
    picture(results, path.with_suffix(".png"), device)


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| new tokens | cache tok/s | full rerun tok/s | cache / full rerun |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['new_tokens']} | {r['cache_tokens_per_s']:.1f} | {r['full_rerun_tokens_per_s']:.1f} "
            f"| {r['speedup']:.2f} |"
        )


def picture(results: list[dict[str, Any]], path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture")
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.38
    x = np.arange(len(results))
    ax.bar(x - width / 2, [r["cache_tokens_per_s"] for r in results], width, label="KV cache")
    ax.bar(x + width / 2, [r["full_rerun_tokens_per_s"] for r in results], width, label="full re-run per token")
    for i, r in enumerate(results):
        ax.annotate(
            f"{r['speedup']:.1f}x", (x[i] - width / 2, r["cache_tokens_per_s"]), ha="center", va="bottom", fontsize=9
        )
    ax.set_xticks(x, [f"{r['new_tokens']} new tokens" for r in results])
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_ylim(0, 1.3 * max(r["cache_tokens_per_s"] for r in results))
    ax.set_title(f"{MODEL} greedy sampling, {len(PROMPTS)} prompts, 8 {device} devices")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
