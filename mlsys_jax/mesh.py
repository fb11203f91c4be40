"""Device meshes from axis sizes or a named preset, with every known axis present.

A mesh made here always carries the six axes of ``AXIS_NAMES`` in that order (size 1 where
unused), so a rule table can name any of them on any mesh. A preset whose axis spans several
slices gets a hybrid device order: each slice is one contiguous block of the DCN axis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from mlsys_jax.meshes import AXIS_NAMES, MeshPreset, load_preset


class MeshError(ValueError):
    """Axis sizes that cannot make a mesh from the devices at hand."""


def parse_axis_sizes(text: str) -> dict[str, int]:
    """Parse ``"data=2,fsdp=2,tensor=2"`` into ``{"data": 2, "fsdp": 2, "tensor": 2}``."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        key = name.strip()
        if key in sizes:
            raise MeshError(
                f"mesh axis {key!r} is given twice in {text!r} ({key}={sizes[key]} and "
                f"{key}={value.strip()}). Fix: name each axis once."
            )
        try:
            if not eq:
                raise ValueError
            sizes[key] = int(value)
        except ValueError:
            raise MeshError(
                f"cannot read mesh axis {part!r} in {text!r}; write sizes as "
                "'data=2,fsdp=2,tensor=2' or name a preset such as 'cpu-8'"
            ) from None
    return sizes


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Check axis names and sizes against the device count; fill one ``-1`` with the rest.

    Returns sizes for every axis in ``AXIS_NAMES`` order (unnamed axes get 1).
    """
    unknown = [k for k in sizes if k not in AXIS_NAMES]
    if unknown:
        raise MeshError(
            f"unknown mesh axis {unknown[0]!r}; mesh axes are {list(AXIS_NAMES)}. Fix: rename it to one of those."
        )
    bad = {k: v for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or (v < 1 and v != -1)}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive integers (or one -1 for 'the rest'); got {bad}")
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise MeshError(f"only one mesh axis may be -1 ('the rest'); got {rest}")
    known = math.prod(v for v in sizes.values() if v != -1)
    full = {name: int(sizes.get(name, 1)) for name in AXIS_NAMES}
    if rest:
        if num_devices % known:
            raise MeshError(
                f"cannot fill mesh axis {rest[0]!r}: the other axes {dict(sizes)} multiply to "
                f"{known}, which does not divide the {num_devices} devices"
            )
        full[rest[0]] = num_devices // known
    total = math.prod(full.values())
    if total != num_devices:
        shown = {k: v for k, v in full.items() if v != 1} or {"data": 1}
        raise MeshError(
            f"mesh axes {shown} need {total} devices but {num_devices} are available. "
            f"Fix: choose sizes whose product is {num_devices} (one axis may be -1 for 'the "
            "rest'), pass devices=... explicitly, or on CPU simulate devices with "
            f"--simulate-devices {total}."
        )
    return full


def make_mesh(
    spec: str | MeshPreset | Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm] (no jaxlib stubs)
    **sizes: int,
) -> Mesh:
    """Build a mesh from axis sizes (``make_mesh(data=2, fsdp=2, tensor=2)``), a preset name
    (``make_mesh("cpu-8")``), a ``MeshPreset``, or an ``"axis=size,..."`` string.

    With nothing given, every device goes on ``data``. Axis types are ``Auto`` so the
    partitioner propagates shardings between the annotations a plan places.
    """
    devices = list(jax.devices() if devices is None else devices)
    slices: dict[str, int] = {}
    if isinstance(spec, str):
        spec = parse_axis_sizes(spec) if any(c in spec for c in "=:,") else load_preset(spec)
    if isinstance(spec, MeshPreset):
        if sizes:
            raise MeshError("give either a preset or axis sizes, not both")
        slices = {a.name: a.slices for a in spec.axes if a.slices > 1}
        sizes = spec.axis_sizes
    elif spec is not None:
        if sizes:
            raise MeshError("give axis sizes either as a mapping or as keywords, not both")
        sizes = dict(spec)
    if not sizes:
        sizes = {"data": -1}
    full = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(full[n] for n in AXIS_NAMES)
    if slices:
        array = hybrid_device_array(devices, full, slices)
    else:
        array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(array, AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES))


def hybrid_device_array(
    devices: Sequence[jax.Device],  # pyright: ignore[reportInvalidTypeForm] (no jaxlib stubs)
    sizes: Mapping[str, int],
    slices: Mapping[str, int],
) -> np.ndarray:
    """Lay devices out so that the axes in ``slices`` cross slices (DCN) as their outer factor
    and everything else stays inside a slice (ICI).

    Slices are the devices' ``slice_index`` where the runtime reports one, else their process,
    else (simulated devices on one host) consecutive blocks of the device list.
    """
    dcn = tuple(slices.get(n, 1) for n in AXIS_NAMES)
    ici = tuple(sizes[n] // dcn[i] for i, n in enumerate(AXIS_NAMES))
    num_slices = math.prod(dcn)
    groups = _slice_groups(devices, num_slices)
    blocks = [mesh_utils.create_device_mesh(ici, group, allow_split_physical_axes=True) for group in groups]
    # (slice..., ici...) -> interleave each axis's DCN factor outside its ICI factor.
    stacked = np.stack(blocks).reshape(dcn + ici)
    n = len(AXIS_NAMES)
    order = [k for i in range(n) for k in (i, n + i)]
    return stacked.transpose(order).reshape(tuple(sizes[a] for a in AXIS_NAMES))


def _slice_groups(devices: Sequence[Any], num_slices: int) -> list[list[Any]]:
    per_slice = len(devices) // num_slices
    for attr in ("slice_index", "process_index"):
        keys = sorted({getattr(d, attr, None) for d in devices}, key=str)
        if None not in keys and len(keys) == num_slices:
            return [[d for d in devices if getattr(d, attr) == k] for k in keys]
    return [list(devices[i * per_slice : (i + 1) * per_slice]) for i in range(num_slices)]


def abstract_mesh(spec: str | MeshPreset | Mapping[str, int]) -> jax.sharding.AbstractMesh:
    """A mesh of the same shape without devices, for planning a machine you do not have."""
    if isinstance(spec, str):
        spec = parse_axis_sizes(spec) if any(c in spec for c in "=:,") else load_preset(spec)
    sizes = spec.axis_sizes if isinstance(spec, MeshPreset) else dict(spec)
    if any(v == -1 for v in sizes.values()):
        raise MeshError("an abstract mesh needs every axis size; -1 ('the rest') has no devices to fill")
    full = resolve_axis_sizes(sizes, math.prod(sizes.values()))
    return jax.sharding.AbstractMesh(
        tuple(full[n] for n in AXIS_NAMES), AXIS_NAMES, axis_types=(AxisType.Auto,) * len(AXIS_NAMES)
    )


def simulate_cpu_devices(count: int, *, check: bool = True) -> None:
    """Ask the CPU backend for ``count`` devices; must run before JAX first touches a device.

    With ``check`` it then starts the backend and confirms the count; leave it off when
    something else (``jax.distributed.initialize``) must run before the backend starts.
    """
    if count < 1:
        raise MeshError(f"--simulate-devices must be at least 1, got {count}")
    if not _backends_started():
        try:
            jax.config.update("jax_num_cpu_devices", count)
        except AttributeError:  # a JAX without the option: the XLA flag, read at backend start
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    if not check:
        return
    have = len(jax.devices("cpu"))
    if have != count:
        raise MeshError(
            f"asked for {count} simulated CPU devices but the backend already started with {have}. "
            "Fix: simulate devices before any JAX computation (first thing in the program)."
        )


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False
