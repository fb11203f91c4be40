"""What a plan costs before it runs: each parameter's placement and the bytes per device of
parameters, gradients and optimizer state, as a rich table."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import optax
from rich.console import Console
from rich.table import Table

from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.train.state import abstract_state


def make_console() -> Console:
    """A console that keeps tables whole in logs (wide when not writing to a terminal)."""
    return Console(width=None if sys.stdout.isatty() else 120)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _device_bytes(tree: Any) -> int:
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryPerDevice:
    """Bytes one device holds for the training state (gradients take the params' layout)."""

    params: int
    grads: int
    opt_state: int
    hbm: int | None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state


def memory_per_device(plan: Plan, model: LanguageModel,
                      optimizer: optax.GradientTransformation) -> MemoryPerDevice:
    state = abstract_state(plan, model.specs, optimizer)
    params = _device_bytes(state.params)
    hbm = plan.device.hbm_bytes if plan.device is not None else None
    return MemoryPerDevice(params, params, _device_bytes(state.opt_state), hbm)


def plan_table(plan: Plan, model: LanguageModel, optimizer: optax.GradientTransformation,
               mesh_label: str, note: str = "") -> Table:
    """Parameter path, shape, logical axes, mesh placement and bytes per device; totals below.
    The title names the model, the rules, ``mesh_label`` (what the user asked for) and the
    mesh's shape, then ``note``."""
    extra = f", {note}" if note else ""
    table = Table(title=f"plan: {model.name} under {plan.rules.name} on {mesh_label} "
                        f"({plan.describe_mesh()}, {plan.num_devices} devices{extra})",
                  title_justify="left")
    for col, justify in (("parameter", "left"), ("shape", "right"), ("logical axes", "left"),
                         ("spec", "left"), ("per device", "right")):
        table.add_column(col, justify=justify, no_wrap=col in ("parameter", "shape", "per device"))
    placements = plan.placements(model.specs)
    for p in placements:
        spec = ", ".join("·" if e is None else e if isinstance(e, str) else "×".join(e) for e in p.spec) or "replicated"
        table.add_row(p.path, "×".join(map(str, p.shape)), ", ".join(str(a) for a in p.logical_axes),
                      spec, human_bytes(p.bytes_per_device))
    mem = memory_per_device(plan, model, optimizer)
    n_params = sum(math.prod(p.shape) for p in placements)
    table.add_section()
    table.add_row(f"{n_params:,} parameters", "", "", "params", human_bytes(mem.params))
    table.add_row("", "", "", "grads", human_bytes(mem.grads))
    table.add_row("", "", "", "optimizer state", human_bytes(mem.opt_state))
    budget = f" of {human_bytes(mem.hbm)}" if mem.hbm else ""
    table.add_row("", "", "", "total (no activations)", human_bytes(mem.total) + budget)
    return table
