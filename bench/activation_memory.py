"""Predicted activation memory against XLA:CPU's compiled temporaries.

For the ``small`` model in fp32 on ``data=8`` (8 simulated CPU devices), at sequences of 256 to
2,048 tokens (the rows per device chosen so each device trains 1,024 to 2,048 tokens), with no
remat and with full remat: ``mlsys_jax.analysis.analyze`` compiles the train step ahead of time
and traces the activation model (``mlsys_jax.analysis.activations``). The ratio compared is
(predicted activations + gradients) / compiled temporary bytes per device. Nothing runs, so the
figures do not depend on the host's load.

Run from the repository root: ``python bench/activation_memory.py`` (writes
bench/results/activation_memory-<device>.json).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
from rich.console import Console
from rich.table import Table

from mlsys_jax.analysis import analyze
from mlsys_jax.parallel.memory import human_bytes

#: (sequence, rows per device)
SHAPES = ((256, 4), (512, 2), (1024, 1), (2048, 1))
DEVICES = 8


def main() -> dict[str, Any]:
    t0 = time.perf_counter()
    rows = []
    for seq, per_device in SHAPES:
        for remat in ("none", "full"):
            a = analyze(
                model="small", mesh=f"data={DEVICES}", batch=DEVICES * per_device, seq=seq, dtype="float32", remat=remat
            )
            assert a.compiled is not None and a.activations is not None
            predicted = a.activations + a.grad_bytes
            rows.append(
                {
                    "seq": seq,
                    "rows_per_device": per_device,
                    "remat": remat,
                    "predicted_activations": a.activations,
                    "gradients": a.grad_bytes,
                    "compiled_temp_bytes": a.compiled.temp_bytes,
                    "ratio": predicted / a.compiled.temp_bytes,
                }
            )
    table = Table(title="predicted activations + gradients vs compiled temporaries (small, fp32, data=8)")
    for name in ("seq x rows", "remat", "predicted", "compiled", "ratio"):
        table.add_column(name, justify="left" if name in ("seq x rows", "remat") else "right")
    for r in rows:
        predicted = r["predicted_activations"] + r["gradients"]
        table.add_row(
            f"{r['seq']} x {r['rows_per_device']}",
            r["remat"],
            human_bytes(predicted),
            human_bytes(r["compiled_temp_bytes"]),
            f"{r['ratio']:.2f}",
        )
    Console(width=120).print(table)
    device = jax.devices()[0].device_kind
    result = {"benchmark": "activation_memory", "device": device, "jax": jax.__version__, "rows": rows}
    out = ROOT / "bench" / "results" / f"activation_memory-{device.lower().replace(' ', '_')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} in {time.perf_counter() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
