"""Model families by name: each registered with its config class, presets, logical axes and
builder, so the recipe, ``mlsys-jax plan`` and ``bench/`` pick a model as ``family:preset``
(``llama:7b``; a bare preset such as ``7b`` means the Llama family).

A family outside this package registers itself when its module is imported. Modules named in
``$MLSYS_JAX_PLUGINS`` (comma-separated module names or ``.py`` paths) and entry points in the
``mlsys_jax.models`` group are imported the first time a name is not found, so a new family
needs no edit anywhere but its own file.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlsys_jax.hints import did_you_mean
from mlsys_jax.models.base import ConfigError, LanguageModel, LogicalAxes

DEFAULT_FAMILY = "llama"
PLUGINS_ENV = "MLSYS_JAX_PLUGINS"
ENTRY_POINTS = "mlsys_jax.models"


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: ``config`` is its frozen config dataclass, ``presets`` its named
    configs, ``axes`` the logical axes its parameters and activations name, and
    ``build(config, name)`` the ``LanguageModel``."""

    name: str
    config: type
    presets: Mapping[str, Any]
    axes: LogicalAxes
    build: Callable[[Any, str], LanguageModel]

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise ConfigError(f"a family name must be non-empty and have no ':', got {self.name!r}")
        for preset, cfg in self.presets.items():
            if not isinstance(cfg, self.config):
                raise ConfigError(
                    f"family {self.name!r}: preset {preset!r} is a {type(cfg).__name__}, not a {self.config.__name__}"
                )


_FAMILIES: dict[str, Family] = {}
_plugins_loaded = False


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Make a family available by name; registering a name twice needs ``replace=True``."""
    if family.name in _FAMILIES and not replace and _FAMILIES[family.name] is not family:
        raise ConfigError(
            f"a model family named {family.name!r} is already registered. Fix: pick "
            "another name, or pass replace=True to swap it."
        )
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


def load_plugins() -> list[str]:
    """Import the modules of ``$MLSYS_JAX_PLUGINS`` and the ``mlsys_jax.models`` entry points
    (once); returns what was imported."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for item in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        _import(item)
        loaded.append(item)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        entry.load()
        loaded.append(entry.value)
    return loaded


def _import(item: str) -> None:
    if item.endswith(".py"):
        path = Path(item).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(
                f"${PLUGINS_ENV} names {item!r}, which is not a file. Fix: give a "
                "module name or the path of a .py file that registers a family."
            )
        spec = importlib.util.spec_from_file_location(f"mlsys_jax_plugin_{path.stem}", path)
        assert spec is not None and spec.loader is not None  # always, for an existing .py file
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[spec.name]
            raise ConfigError(
                f"${PLUGINS_ENV} names {item!r}, which failed to load: "
                f"{type(err).__name__}: {err}. Fix: correct that file."
            ) from err
        return
    try:
        importlib.import_module(item)
    except ImportError as err:
        raise ConfigError(
            f"${PLUGINS_ENV} names module {item!r}, which cannot be imported: {err}. "
            "Fix: put it on PYTHONPATH or give the path of its .py file."
        ) from err


def get_family(name: str) -> Family:
    """A registered family by name (plugins are imported the first time one is missing)."""
    if name not in _FAMILIES:
        load_plugins()
    if name not in _FAMILIES:
        hint = did_you_mean(name, list(_FAMILIES))
        raise ConfigError(
            f"unknown model family {name!r}; the registered families are {sorted(_FAMILIES)}.{hint} "
            f"Fix: name one of those, or register yours (register_family in its module, imported "
            f"through ${PLUGINS_ENV} or a '{ENTRY_POINTS}' entry point)."
        )
    return _FAMILIES[name]


def parse_model(name: str) -> tuple[Family, str]:
    """``"family:preset"`` (or a bare Llama preset) as the family and the preset's name."""
    family_name, _, preset = name.rpartition(":")
    family = get_family(family_name or DEFAULT_FAMILY)
    if preset not in family.presets:
        hint = did_you_mean(preset, list(family.presets))
        raise ConfigError(
            f"unknown model {name!r}: family {family.name!r} has the presets {list(family.presets)}.{hint}"
        )
    return family, preset


def canonical_name(name: str) -> str:
    """``family:preset`` for any accepted spelling of a model name."""
    family, preset = parse_model(name)
    return f"{family.name}:{preset}"


def get_config(name: str, **overrides: Any) -> Any:
    """A preset's config by model name, with field overrides (``get_config("tiny", n_layers=4)``)."""
    family, preset = parse_model(name)
    cfg = family.presets[preset]
    if not overrides:
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"family {family.name!r} has no config field(s) {unknown}; its fields are {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def build_model(name: str, **overrides: Any) -> LanguageModel:
    """The ``LanguageModel`` of a named preset, with config overrides."""
    family, _ = parse_model(name)
    return family.build(get_config(name, **overrides), name)


def declared_axes(kind: str) -> frozenset[str]:
    """Every logical axis a registered family names for ``kind`` ("param" or "activation"): a
    plan replicates such an axis unless its rules map it, and refuses any other name."""
    out: set[str] = set()
    for family in _FAMILIES.values():
        out.update(family.axes.params if kind == "param" else family.axes.activations)
    return frozenset(out)
