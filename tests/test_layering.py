"""The layers import downward only, and each hot operation has one reference: the jnp code in
``kernels/`` that every backend and the model's plain-XLA path share."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: What each layer's modules may not import (prefixes of ``mlsys_jax`` module names).
FORBIDDEN = {
    "kernels": (
        "mlsys_jax.analysis",
        "mlsys_jax.models",
        "mlsys_jax.parallel",
        "mlsys_jax.train",
        "mlsys_jax.serve",
        "mlsys_jax.mesh",
        "mlsys_jax.cli",
        "mlsys_jax.distributed",
    ),
    "mlsys_jax/analysis": ("mlsys_jax.serve", "mlsys_jax.cli"),
    "mlsys_jax/models": (
        "mlsys_jax.parallel",
        "mlsys_jax.train",
        "mlsys_jax.serve",
        "mlsys_jax.mesh",
        "mlsys_jax.meshes",
        "mlsys_jax.analysis",
        "mlsys_jax.cli",
        "mlsys_jax.distributed",
    ),
    "mlsys_jax/parallel": ("mlsys_jax.train", "mlsys_jax.serve", "mlsys_jax.cli", "mlsys_jax.analysis"),
    "mlsys_jax/train": ("mlsys_jax.cli", "mlsys_jax.analysis"),
}

#: Exceptions to ``FORBIDDEN``: the runtime's fit check uses the analysis's memory model.
ALLOWED = {"mlsys_jax/train": ("mlsys_jax.analysis.memory",)}


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", list(FORBIDDEN))
def test_imports_point_down_the_layers(folder):
    for path in modules(folder):
        allowed = ALLOWED.get(folder, ())
        bad = [n for n in imported(path) if n.startswith(FORBIDDEN[folder]) and n not in allowed]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def defined_functions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in modules("mlsys_jax") + modules("kernels"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                out.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    return out


def test_each_reference_is_defined_once_in_the_kernels():
    found = defined_functions()
    for name in (
        "attention_reference",
        "rms_norm_reference",
        "layer_norm_reference",
        "linear_cross_entropy_reference",
        "token_losses",
    ):
        assert len(found[name]) == 1 and found[name][0].startswith("kernels/"), (name, found[name])
    # The model's former copies are gone.
    for name in ("attention_xla", "attention_cudnn", "cross_entropy_sums", "logits_projection"):
        assert name not in found, (name, found.get(name))


def test_only_the_kernels_compute_attention_softmax_norms_or_cross_entropy():
    for path in modules("mlsys_jax/models") + modules("mlsys_jax/train") + modules("mlsys_jax/serve"):
        text = path.read_text()
        for call in ("dot_product_attention", "log_softmax", "nn.softmax", "logsumexp", "rsqrt"):
            assert call not in text, f"{path.relative_to(ROOT)} computes {call} itself"
