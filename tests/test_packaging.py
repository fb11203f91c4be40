"""Packaging: kernels/ installs as mlsys_jax.kernels, mesh presets ship inside the wheel and load
by name from a plain (non-editable) install."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest


@pytest.fixture(scope="module")
def wheel(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(repo_root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("mlsys_jax-*.whl")
    return path


def test_wheel_maps_kernels_and_meshes_under_the_package(wheel, repo_root):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlsys_jax/kernels/__init__.py" in names
    # Every subpackage of the source tree ships, kernel families included.
    for root, installed in (("mlsys_jax", "mlsys_jax"), ("kernels", "mlsys_jax/kernels")):
        for init in (repo_root / root).rglob("__init__.py"):
            relative = init.relative_to(repo_root / root).as_posix()
            assert f"{installed}/{relative}" in names, relative
    assert "mlsys_jax/kernels/attention/triton.py" in names
    assert "mlsys_jax/meshes/__init__.py" in names
    for preset in ("cpu-8", "gpu-h100x8", "gpu-h200x8", "tpu-v5p-64", "tpu-v5e-256", "tpu-v5e-2x256"):
        assert f"mlsys_jax/meshes/{preset}.toml" in names
    assert not any(n.startswith(("kernels/", "meshes/", "recipes/", "tests/", "bench/")) for n in names)


def test_presets_load_by_name_from_an_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    code = textwrap.dedent(
        f"""
        import mlsys_jax, mlsys_jax.kernels, mlsys_jax.kernels.attention
        assert mlsys_jax.__file__.startswith({str(target)!r}), mlsys_jax.__file__
        assert mlsys_jax.kernels.attention.__file__.startswith({str(target)!r})
        assert mlsys_jax.kernels.__file__.startswith({str(target)!r})
        preset = mlsys_jax.load_preset("tpu-v5e-2x256")
        print(preset.num_devices, sorted(mlsys_jax.preset_names()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("512 ") and "gpu-h200x8" in run.stdout


def test_a_source_tree_on_the_path_maps_the_same_names(repo_root, tmp_path):
    """Running from a checkout with PYTHONPATH=. (no install) serves both names from that checkout."""
    tree = tmp_path / "checkout"
    for folder in ("mlsys_jax", "kernels", "meshes"):
        shutil.copytree(repo_root / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import mlsys_jax.kernels, mlsys_jax.meshes as m; "
        "print(m.load_preset('cpu-8').num_devices, mlsys_jax.kernels.__file__, m.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    count, kernels_file, meshes_file = run.stdout.split()
    assert count == "8"
    assert kernels_file == str(tree / "kernels" / "__init__.py")
    assert meshes_file == str(tree / "meshes" / "__init__.py")
