"""Compiled memory of the LM-head loss, forward and backward: unfused reference vs fused backends.

Compiles value_and_grad of the summed ``linear_cross_entropy`` wrt hidden and weight (bf16) for
each backend at tokens=4096 (2 x 2048), D=1024, vocab=32768, and reads XLA's
``memory_analysis()``. Peak is reported as temp + output bytes (the arguments are the same for
every backend); the acceptance target is fused peak <= 1/4 of the unfused one. Nothing is run,
so this is cheap on any device. Pallas backends are compiled only where they are native (their
interpret mode on CPU measures the interpreter, not the kernel).

Run from the repository root: ``python bench/loss_memory.py`` (writes
bench/results/loss_memory-<device>.json).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.cross_entropy import LINEAR_CROSS_ENTROPY, linear_cross_entropy
from mlsys_jax.kernels.dispatch import current_platform

BATCH, SEQ, D_MODEL, VOCAB = 2, 2048, 1024, 32768
DTYPE = jnp.bfloat16
TARGET_RATIO = 0.25
MIB = 2**20


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def backends() -> list[str]:
    """The reference, then every fused backend that compiles natively here."""
    platform = current_platform()
    fused = [
        name
        for name in LINEAR_CROSS_ENTROPY.names()
        if name != "xla" and platform in LINEAR_CROSS_ENTROPY.backends[name].platforms
    ]
    return ["xla", *fused]


def measure(implementation: str) -> dict[str, Any]:
    hidden = jax.ShapeDtypeStruct((BATCH, SEQ, D_MODEL), DTYPE)
    weight = jax.ShapeDtypeStruct((D_MODEL, VOCAB), DTYPE)
    labels = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)

    def total(h, w, lab):
        return linear_cross_entropy(h, w, lab, implementation=implementation).sum()

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(total, argnums=(0, 1))).lower(hidden, weight, labels).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    assert mem is not None
    temp, out, arg = mem.temp_size_in_bytes, mem.output_size_in_bytes, mem.argument_size_in_bytes
    return {
        "backend": implementation,
        "compile_s": round(seconds, 2),
        "temp_bytes": temp,
        "output_bytes": out,
        "argument_bytes": arg,
        "peak_bytes": temp + out,
    }


def main() -> dict[str, Any]:
    rows = [measure(name) for name in backends()]
    unfused = rows[0]["peak_bytes"]
    for row in rows:
        row["ratio_to_unfused"] = round(row["peak_bytes"] / unfused, 4)
    device = jax.devices()[0].device_kind
    fused = [r for r in rows if r["backend"] != "xla"]
    result = {
        "device": device,
        "tokens": BATCH * SEQ,
        "d_model": D_MODEL,
        "vocab": VOCAB,
        "dtype": jnp.dtype(DTYPE).name,
        "peak": "temp + output bytes of the compiled step",
        "target_ratio": TARGET_RATIO,
        "rows": rows,
        "meets_target": bool(fused) and all(r["ratio_to_unfused"] <= TARGET_RATIO for r in fused),
    }
    print(
        f"linear cross-entropy fwd+bwd, {BATCH}x{SEQ} tokens, D={D_MODEL}, V={VOCAB}, "
        f"{jnp.dtype(DTYPE).name}, {device}\n"
    )
    print("| backend | temp MiB | output MiB | peak MiB | fused/unfused | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['temp_bytes'] / MIB:.1f} | {r['output_bytes'] / MIB:.1f} | "
            f"{r['peak_bytes'] / MIB:.1f} | {r['ratio_to_unfused']:.3f} | {r['compile_s']} |"
        )
    out = ROOT / "bench" / "results" / f"loss_memory-{slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"\ntarget fused/unfused <= {TARGET_RATIO}: {'met' if result['meets_target'] else 'NOT met'}"
        f"; wrote {out.relative_to(ROOT)}"
    )
    return result


if __name__ == "__main__":
    main()
