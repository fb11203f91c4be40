"""Make ``kernels/`` and ``meshes/`` importable as ``mlsys_jax.kernels`` and ``mlsys_jax.meshes``
when the toolkit runs from a source tree (``PYTHONPATH=.``) rather than from an install."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_MAPPED = ("kernels", "meshes")


def mount_source_subpackages(package: str, package_dir: str) -> None:
    """Register sibling folders of the package as its subpackages if an install did not."""
    here = Path(package_dir)
    root = here.parent
    for name in _MAPPED:
        full = f"{package}.{name}"
        if full in sys.modules or (here / name).is_dir():
            continue
        init = root / name / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(root / name)])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(sys.modules[package], name, module)
