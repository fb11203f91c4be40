"""How long a whole plan analysis takes for large models on large meshes: ``mlsys_jax.analysis.
analyze`` (the recipe's train step compiled ahead of time in a subprocess simulating every
device, the traced activation model, the collectives read from the HLO) and the predicted step.

Cases: ``7b`` on 64 devices, ``70b`` on 256 and ``70b`` on 1024, sequence 2048, one sequence per
batch shard. The target is under 20 s each on this machine. Wall time includes starting the
subprocess and JAX; the compile time is XLA's alone.

Run from the repository root: ``python bench/plan_scale.py`` (writes
bench/results/plan_scale.json).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console
from rich.table import Table

from mlsys_jax.analysis import analyze
from mlsys_jax.parallel.memory import human_bytes

#: (model, mesh sizes, global batch)
CASES = (
    ("7b", "fsdp=64", 64),
    ("70b", "fsdp=32,tensor=8", 32),
    ("70b", "data=4,fsdp=32,tensor=8", 128),
)
SEQ = 2048
TARGET_S = 20.0


def main() -> dict[str, Any]:
    rows = []
    for model, mesh, batch in CASES:
        t0 = time.perf_counter()
        a = analyze(model=model, mesh=mesh, batch=batch, seq=SEQ)
        wall = time.perf_counter() - t0
        assert a.compiled is not None
        rows.append(
            {
                "model": model,
                "mesh": mesh,
                "devices": a.devices,
                "batch": batch,
                "seq": SEQ,
                "wall_s": wall,
                "compile_s": a.compiled.compile_seconds,
                "state_bytes_per_device": a.state_bytes,
                "activations_per_device": a.activations,
                "collective_ops": len(a.collectives),
                "within_target": wall < TARGET_S,
            }
        )
    table = Table(title=f"whole plan analysis, seq {SEQ} (target under {TARGET_S:.0f} s)")
    for name in ("model", "mesh", "devices", "wall s", "XLA compile s", "state / device", "collective ops"):
        table.add_column(name, justify="left" if name in ("model", "mesh") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["mesh"],
            str(r["devices"]),
            f"{r['wall_s']:.1f}",
            f"{r['compile_s']:.1f}",
            human_bytes(r["state_bytes_per_device"]),
            str(r["collective_ops"]),
        )
    Console(width=120).print(table)
    result = {"benchmark": "plan_scale", "rows": rows}
    out = ROOT / "bench" / "results" / "plan_scale.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
