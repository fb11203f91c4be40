"""Logical-axis rules: which mesh axes shard each named dimension of parameters and activations.

Parameters and activations get separate tables because the same name means different things in
each: under FSDP a weight's ``embed`` dim is sharded over ``fsdp`` while the activations'
``embed`` dim stays whole and their ``batch`` dim takes ``fsdp``.

A preset maps only the axes it shards, using the toolkit's conventional names (``batch``,
``seq``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``vocab``, ...). Any other logical axis a
registered model family declares stays whole; a name that neither the rules map nor any family
declares is refused by the plan (``Plan.resolve``), with the nearest known name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

MeshAxes = str | tuple[str, ...] | None
RulePairs = tuple[tuple[str, MeshAxes], ...]


def _pairs(rules: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]]) -> RulePairs:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for name, target in items:
        if isinstance(target, list):
            target = tuple(target)
        out.append((str(name), target))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Rules:
    """Two rule tables, as ``(logical axis, mesh axes)`` pairs in the style of flax and t5x.

    A logical axis may appear more than once only with the same target; two different targets
    are a conflict that the plan reports where the axis is first used.
    """

    params: RulePairs
    activations: RulePairs
    name: str = "custom"

    def __init__(
        self,
        params: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]],
        activations: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]],
        name: str = "custom",
    ) -> None:
        object.__setattr__(self, "params", _pairs(params))
        object.__setattr__(self, "activations", _pairs(activations))
        object.__setattr__(self, "name", name)

    def table(self, kind: str) -> RulePairs:
        return self.params if kind == "param" else self.activations

    def override(
        self,
        params: Mapping[str, MeshAxes] | None = None,
        activations: Mapping[str, MeshAxes] | None = None,
    ) -> Rules:
        """A copy with some rules replaced (or added), e.g. ``override(params={"kv_heads": None})``."""

        def merge(base: RulePairs, new: Mapping[str, MeshAxes] | None) -> RulePairs:
            if not new:
                return base
            kept = tuple((k, v) for k, v in base if k not in new)
            return kept + _pairs(new)

        return Rules(
            merge(self.params, params),
            merge(self.activations, activations),
            name=f"{self.name}+override",
        )

    def with_sequence_parallel(self, axis: str = "sequence") -> Rules:
        """Shard the activations' ``seq`` dim over ``axis`` (context parallelism)."""
        out = self.override(activations={"seq": axis})
        return dataclasses.replace(out, name=f"{self.name}+sp")

    def with_pipeline(self, axis: str = "pipeline") -> Rules:
        """Cut the stacked ``layers`` dim into ``axis`` contiguous stages (pipeline parallelism):
        every other rule stays, so each stage's slice is sharded inside the stage as before."""
        out = self.override(params={"layers": axis})
        return dataclasses.replace(out, name=f"pp_{self.name}")

    @property
    def pipelined(self) -> bool:
        """Whether the stacked layers are cut over the ``pipeline`` axis."""
        return dict(self.params).get("layers") == "pipeline"

    def mesh_axes_used(self) -> set[str]:
        used: set[str] = set()
        for _, target in self.params + self.activations:
            if target is None:
                continue
            used.update((target,) if isinstance(target, str) else target)
        return used


_TP = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


#: Rule presets, one per strategy. Each names only the mesh axes in ``STRATEGY_AXES``.
RULE_PRESETS: dict[str, Rules] = {
    "dp": Rules({}, {"batch": "data"}, "dp"),
    "fsdp": Rules({"embed": "fsdp"}, {"batch": "fsdp"}, "fsdp"),
    "tp": Rules(_TP, _TP, "tp"),
    "dp_tp": Rules(_TP, {"batch": "data", **_TP}, "dp_tp"),
    "dp_fsdp": Rules({"embed": "fsdp"}, {"batch": ("data", "fsdp")}, "dp_fsdp"),
    "fsdp_tp": Rules({"embed": "fsdp", **_TP}, {"batch": "fsdp", **_TP}, "fsdp_tp"),
    "dp_fsdp_tp": Rules({"embed": "fsdp", **_TP}, {"batch": ("data", "fsdp"), **_TP}, "dp_fsdp_tp"),
}

#: The mesh axes each strategy spreads work over, outermost first.
STRATEGY_AXES: dict[str, tuple[str, ...]] = {
    "dp": ("data",),
    "fsdp": ("fsdp",),
    "tp": ("tensor",),
    "dp_tp": ("data", "tensor"),
    "dp_fsdp": ("data", "fsdp"),
    "fsdp_tp": ("fsdp", "tensor"),
    "dp_fsdp_tp": ("data", "fsdp", "tensor"),
}

# Pipeline parallelism is a modifier on any preset: ``pp_<preset>`` cuts the layers into stages
# over ``pipeline`` and shards each stage as ``<preset>`` does (``pp_dp``, ``pp_fsdp``, ``pp_tp``,
# ``pp_dp_fsdp_tp``, ...); ``pp`` alone pipelines with nothing else sharded.
for _name, _preset in list(RULE_PRESETS.items()):
    RULE_PRESETS[f"pp_{_name}"] = _preset.with_pipeline()
    STRATEGY_AXES[f"pp_{_name}"] = ("pipeline", *STRATEGY_AXES[_name])
RULE_PRESETS["pp"] = Rules({"layers": "pipeline"}, {}, "pp")
STRATEGY_AXES["pp"] = ("pipeline",)


def rules(strategy: str, *, sequence_parallel: bool = False) -> Rules:
    """The rule preset for a strategy name (``dp``, ``fsdp``, ``tp``, ``fsdp_tp``, ...)."""
    from mlsys_jax.parallel.errors import PlanError

    if strategy not in RULE_PRESETS:
        raise PlanError(
            f"unknown strategy {strategy!r}; the presets are {sorted(RULE_PRESETS)}. "
            "Fix: pick one of those, or build mlsys_jax.Rules(params=..., activations=...)."
        )
    out = RULE_PRESETS[strategy]
    return out.with_sequence_parallel() if sequence_parallel else out
