"""Plans: logical-axis rules, strategy presets and the placement checks behind them."""

from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.layout import fit_preset, resolve_mesh, strategy_axes
from mlsys_jax.parallel.plan import Placement, Plan
from mlsys_jax.parallel.rules import RULE_PRESETS, STRATEGY_AXES, Rules, rules

__all__ = [
    "RULE_PRESETS",
    "STRATEGY_AXES",
    "Placement",
    "Plan",
    "PlanError",
    "Rules",
    "fit_preset",
    "resolve_mesh",
    "rules",
    "strategy_axes",
]
