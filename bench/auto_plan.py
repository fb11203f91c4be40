"""The auto-planner (``mlsys_jax.analysis.planner.auto_plan``, ``mlsys-jax plan --auto``) on the
cases the README discusses, with the time each takes on this machine.

- ``8b`` on 256 chips of ``tpu-v5e-256`` with the recipe's default kernels: the timing case,
  whose whole run (enumeration, analytic ranking, three confirming compiles in subprocesses that
  simulate 256 devices) must take under 120 s;
- ``7b`` on ``gpu-h100x8``, ``7b`` on ``tpu-v5p-64`` (32 chips) and ``70b`` on ``tpu-v5e-256``
  with the memory-lean kernels a run at these sizes uses (``--attention-impl pallas``: flash
  attention; ``--loss-impl fused``: no whole logits). With XLA's attention the (seq x seq)
  scores dominate the activations and memory, not communication, decides; ``70b`` then fits
  nowhere on 16 GiB chips at 4,096 tokens per chip.

Every case plans the default batch (one 4,096-token sequence per chip). Beside each winner the
JSON keeps the rules of thumb's figures for its hardware: the tokens per chip per step above
which FSDP's weight traffic hides behind compute (peak FLOP/s over the link's bandwidth: ~2,200
on H100 NVLink and v5e ICI, ~2,550 on v5p ICI; times the microbatches, which repeat the gathers,
over 4/3 per recomputed forward and over the tensor and pipeline ways, which shrink what each
device gathers), and the tensor-parallel degree beyond which a layer's
activation all-reduces outlast its matmuls (~4.5 d_model x bandwidth / peak + 1).

Run from the repository root: ``python bench/auto_plan.py`` (writes bench/results/auto_plan.json).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console

from mlsys_jax.analysis.planner import PlannerResult, auto_plan, hardware_for, print_result
from mlsys_jax.meshes import load_preset
from mlsys_jax.models import registry

LEAN = {"attention_impl": "pallas", "loss_impl": "fused"}
#: (model, hardware, devices, fixed settings)
CASES: tuple[tuple[str, str, int, dict[str, Any]], ...] = (
    ("8b", "tpu-v5e-256", 256, {}),
    ("7b", "gpu-h100x8", 8, LEAN),
    ("7b", "tpu-v5p-64", 32, LEAN),
    ("70b", "tpu-v5e-256", 256, LEAN),
)
CONFIRM = 3
TARGET_S = 120.0


def rules_of_thumb(result: PlannerResult) -> dict[str, Any]:
    """The scaling rules' figures for the winner's hardware and shape."""
    w = result.winner
    preset = load_preset(result.hardware)
    laid = hardware_for(preset, w.sizes)
    link = laid.link_of("fsdp" if w.sizes.get("fsdp", 1) > 1 else laid.axes[0].name)
    ratio = preset.device.peak_bf16_flops / link.bandwidth
    d_model = registry.get_config(result.model).d_model
    m = w.flags["microbatches"] if w.sizes.get("pipeline", 1) == 1 else 1
    recompute = 1 + w.recomputes / 3
    return {
        "tokens_per_chip": w.tokens_per_chip,
        "fsdp_compute_bound_above_tokens_per_chip": ratio,
        # Tensor and pipeline stages shrink the weights each device gathers; microbatches repeat
        # the gathers; recomputed forwards add compute to hide them behind.
        "fsdp_threshold_for_winner": ratio * m / (recompute * w.sizes.get("tensor", 1) * w.sizes.get("pipeline", 1)),
        "tensor_compute_bound_up_to_ways": 4.5 * d_model / ratio + 1,
        "link": link.name,
        "link_bandwidth": link.bandwidth,
        "peak_flops": preset.device.peak_bf16_flops,
    }


def main() -> dict[str, Any]:
    console = Console(width=200)
    rows = []
    for model, hardware, devices, fixed in CASES:
        t0 = time.perf_counter()
        result = auto_plan(devices, hardware, model, confirm=CONFIRM, **fixed)
        wall = time.perf_counter() - t0
        console.rule(f"{model} on {devices} x {hardware} {fixed or '(recipe defaults)'}: {wall:.1f} s")
        print_result(result, console)
        w = result.winner
        rows.append(
            {
                **result.to_json(),
                "fixed": fixed,
                "wall_s": wall,
                "winner_step_s": w.step_s,
                "winner_mfu": w.mfu,
                "winner_tokens_per_s_per_chip": w.tokens_per_s / devices,
                "rules_of_thumb": rules_of_thumb(result),
            }
        )
    timing = rows[0]
    timing["within_target"] = timing["wall_s"] < TARGET_S
    console.print(
        f"8b on 256 chips: {timing['wall_s']:.1f} s (target under {TARGET_S:.0f} s: "
        f"{'met' if timing['within_target'] else 'MISSED'})"
    )
    result = {"benchmark": "auto_plan", "confirm": CONFIRM, "target_s": TARGET_S, "rows": rows}
    out = ROOT / "bench" / "results" / "auto_plan.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
