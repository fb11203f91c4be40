"""How long the whole plan report takes for large models on large meshes: ``mlsys-jax plan
--compile --html`` (the recipe's train step compiled ahead of time in a subprocess simulating
every device, the memory model, the collectives read from the HLO, the predicted step, the fit
check, the terminal views and the HTML page).

Cases: ``7b`` on 64 devices, ``70b`` on 256 and ``70b`` on 1024, sequence 2048, one sequence per
batch shard, priced on a TPU preset. The target is under 20 s each on this machine. Wall time
includes starting the subprocess and JAX; the compile time is XLA's alone.

Run from the repository root: ``python bench/plan_scale.py`` (writes
bench/results/plan_scale.json).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console
from rich.table import Table

from mlsys_jax.cli import PlanConfig, plan
from mlsys_jax.parallel.memory import human_bytes

#: (model, mesh sizes, global batch, the preset that prices it)
CASES = (
    ("7b", "fsdp=64", 64, "tpu-v5p-64"),
    ("70b", "fsdp=32,tensor=8", 32, "tpu-v5e-256"),
    ("70b", "data=4,fsdp=32,tensor=8", 128, "tpu-v5e-256"),
)
SEQ = 2048
TARGET_S = 20.0


def main() -> dict[str, Any]:
    rows = []
    for model, mesh, batch, hardware in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            html, data = Path(tmp) / "plan.html", Path(tmp) / "plan.json"
            cfg = PlanConfig(
                model=model,
                mesh=mesh,
                batch=batch,
                seq=SEQ,
                hardware=hardware,
                remat="full",
                compile=True,
                html=str(html),
                json=str(data),
            )
            t0 = time.perf_counter()
            plan(cfg, console=Console(file=io.StringIO(), width=160))
            wall = time.perf_counter() - t0
            a = json.loads(data.read_text())
            html_bytes = html.stat().st_size
        assert a["compiled"] is not None
        rows.append(
            {
                "model": model,
                "mesh": mesh,
                "devices": len(a["params"][0]["shards"]),
                "hardware": hardware,
                "batch": batch,
                "seq": SEQ,
                "wall_s": wall,
                "compile_s": a["compiled"]["compile_seconds"],
                "state_bytes_per_device": a["memory"]["state"],
                "activations_per_device": a["memory"]["activations"],
                "fits": a["memory"]["fits"],
                "collective_kinds": len(a["collectives"]),
                "html_bytes": html_bytes,
                "within_target": wall < TARGET_S,
            }
        )
    table = Table(
        title=f"whole plan report (--compile --html --json), seq {SEQ}, remat full (target under {TARGET_S:.0f} s)"
    )
    for name in ("model", "mesh", "devices", "wall s", "XLA compile s", "state / device", "fits", "HTML"):
        table.add_column(name, justify="left" if name in ("model", "mesh") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["mesh"],
            str(r["devices"]),
            f"{r['wall_s']:.1f}",
            f"{r['compile_s']:.1f}",
            human_bytes(r["state_bytes_per_device"]),
            f"{r['fits']} on {r['hardware']}",
            human_bytes(r["html_bytes"]),
        )
    Console(width=120).print(table)
    result = {"benchmark": "plan_scale", "rows": rows}
    out = ROOT / "bench" / "results" / "plan_scale.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
