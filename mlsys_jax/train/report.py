"""What a plan costs before it runs: each parameter's placement and the bytes per device of
parameters, gradients, optimizer state and activations, as a rich table."""

from __future__ import annotations

import math
import sys
from typing import cast

from rich.console import Console, JustifyMethod
from rich.table import Table

from mlsys_jax.analysis.memory import PlanMemory
from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel.memory import human_bytes
from mlsys_jax.parallel.plan import Plan

__all__ = ["human_bytes", "make_console", "plan_table"]


def make_console() -> Console:
    """A console that keeps tables whole in logs (wide when not writing to a terminal)."""
    return Console(width=None if sys.stdout.isatty() else 120)


def plan_table(
    plan: Plan,
    model: LanguageModel,
    mem: PlanMemory,
    mesh_label: str,
    note: str = "",
) -> Table:
    """Parameter path, shape, logical axes, mesh placement and bytes per device; totals below.
    The title names the model, the rules, ``mesh_label`` (what the user asked for) and the
    mesh's shape, then ``note``."""
    extra = f", {note}" if note else ""
    table = Table(
        title=f"plan: {model.name} under {plan.rules.name} on {mesh_label} "
        f"({plan.describe_mesh()}, {plan.num_devices} devices{extra})",
        title_justify="left",
    )
    for col, justify in (
        ("parameter", "left"),
        ("shape", "right"),
        ("logical axes", "left"),
        ("spec", "left"),
        ("per device", "right"),
    ):
        table.add_column(col, justify=cast(JustifyMethod, justify), no_wrap=col in ("parameter", "shape", "per device"))
    placements = plan.placements(model.specs)
    for p in placements:
        spec = ", ".join("·" if e is None else e if isinstance(e, str) else "×".join(e) for e in p.spec) or "replicated"
        table.add_row(
            p.path,
            "×".join(map(str, p.shape)),
            ", ".join(str(a) for a in p.logical_axes),
            spec,
            human_bytes(p.bytes_per_device),
        )
    n_params = sum(math.prod(p.shape) for p in placements)
    table.add_section()
    table.add_row(f"{n_params:,} parameters", "", "", "params", human_bytes(mem.params))
    table.add_row("", "", "", "grads", human_bytes(mem.grads))
    table.add_row("", "", "", "optimizer state", human_bytes(mem.opt_state))
    budget = f" of {human_bytes(mem.hbm)}" if mem.hbm else ""
    table.add_row("", "", "", "activations", human_bytes(mem.activations))
    table.add_row("", "", "", "total", human_bytes(mem.total) + budget)
    return table
