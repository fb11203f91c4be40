"""Mesh presets: the axis sizes of a device mesh and the hardware they run on.

Each ``*.toml`` file beside this module describes one machine: the device (kind, peak bf16
FLOP/s, HBM bytes and bandwidth), the mesh axes in order (outermost first) with the link their
collectives cross, and the strategy that suits it. This module only reads and checks them; it
imports nothing from the rest of the toolkit, so a planning tool can load it on its own.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from collections.abc import Mapping
from typing import Any

#: Mesh axes the toolkit knows, outermost (slowest links) first.
AXIS_NAMES: tuple[str, ...] = ("pipeline", "data", "fsdp", "expert", "sequence", "tensor")


class PresetError(ValueError):
    """A mesh preset that does not exist or does not describe a usable mesh."""


@dataclasses.dataclass(frozen=True)
class Link:
    """A class of interconnect: bandwidth per device and direction (bytes/s), latency (s)."""

    name: str
    bandwidth: float
    latency: float


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator: what the roofline and the memory check need."""

    kind: str
    platform: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bandwidth: float


@dataclasses.dataclass(frozen=True)
class MeshAxis:
    """One mesh axis: its size, the link its collectives cross, and how many slices it spans.

    ``slices > 1`` means the axis crosses the data-centre network (DCN) between slices: the
    devices are laid out so that each slice holds ``size // slices`` consecutive positions.
    """

    name: str
    size: int
    link: str
    slices: int = 1


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A named machine: the mesh axes and the hardware behind them."""

    name: str
    description: str
    device: Device
    axes: tuple[MeshAxis, ...]
    links: Mapping[str, Link]
    strategy: str

    @property
    def axis_sizes(self) -> dict[str, int]:
        return {a.name: a.size for a in self.axes}

    @property
    def num_devices(self) -> int:
        n = 1
        for a in self.axes:
            n *= a.size
        return n

    @property
    def num_slices(self) -> int:
        n = 1
        for a in self.axes:
            n *= a.slices
        return n

    def link_of(self, axis: str) -> Link:
        """The link a collective over ``axis`` crosses."""
        for a in self.axes:
            if a.name == axis:
                return self.links[a.link]
        raise PresetError(f"mesh preset {self.name!r} has no axis {axis!r}; its axes are {[a.name for a in self.axes]}")


def preset_names() -> list[str]:
    """Names of the presets that ship with the toolkit."""
    root = importlib.resources.files(__name__)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> MeshPreset:
    """Load a shipped preset by name (``"cpu-8"``, ``"gpu-h100x8"``, ...)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise PresetError(
            f"mesh preset name {name!r} is not a name: presets are the files shipped with the toolkit, "
            f"{preset_names()}, named without a path. Fix: pick one of those, or give axis sizes such as "
            "'data=2,fsdp=2,tensor=2'."
        )
    path = importlib.resources.files(__name__) / f"{name}.toml"
    if not path.is_file():
        raise PresetError(
            f"unknown mesh preset {name!r}; the shipped presets are {preset_names()}. "
            "Fix: pick one of those, or give axis sizes such as 'data=2,fsdp=2,tensor=2'."
        )
    return parse_preset(name, tomllib.loads(path.read_text()))


def parse_preset(name: str, raw: Mapping[str, Any]) -> MeshPreset:
    """Check and build a preset from its TOML table; every problem names the field to fix."""

    def need(table: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in table:
            raise PresetError(f"mesh preset {name!r}: {where} is missing {key!r}")
        return table[key]

    dev = need(raw, "device", "the file")
    device = Device(
        kind=str(need(dev, "kind", "[device]")),
        platform=str(need(dev, "platform", "[device]")),
        peak_bf16_flops=float(need(dev, "peak_bf16_flops", "[device]")),
        hbm_bytes=int(need(dev, "hbm_bytes", "[device]")),
        hbm_bandwidth=float(need(dev, "hbm_bandwidth", "[device]")),
    )
    links = {
        lname: Link(
            lname,
            float(need(spec, "bandwidth", f"[links.{lname}]")),
            float(need(spec, "latency", f"[links.{lname}]")),
        )
        for lname, spec in need(raw, "links", "the file").items()
    }
    axes = []
    for i, spec in enumerate(need(raw, "axes", "the file")):
        axis = MeshAxis(
            name=str(need(spec, "name", f"[[axes]] #{i}")),
            size=int(need(spec, "size", f"[[axes]] #{i}")),
            link=str(need(spec, "link", f"[[axes]] #{i}")),
            slices=int(spec.get("slices", 1)),
        )
        if axis.name not in AXIS_NAMES:
            raise PresetError(f"mesh preset {name!r}: axis {axis.name!r} is not one of {AXIS_NAMES}")
        if axis.link not in links:
            raise PresetError(
                f"mesh preset {name!r}: axis {axis.name!r} names link {axis.link!r}, "
                f"which has no [links.{axis.link}] table"
            )
        if axis.size < 1 or axis.slices < 1 or axis.size % axis.slices:
            raise PresetError(
                f"mesh preset {name!r}: axis {axis.name!r} has size {axis.size} over "
                f"{axis.slices} slices; the size must be a positive multiple of the slices"
            )
        axes.append(axis)
    order = [a.name for a in axes]
    if order != [n for n in AXIS_NAMES if n in order]:
        raise PresetError(f"mesh preset {name!r}: axes {order} must follow the order {AXIS_NAMES}")
    return MeshPreset(
        name=name,
        description=str(raw.get("description", "")),
        device=device,
        axes=tuple(axes),
        links=links,
        strategy=str(need(raw, "strategy", "the file")),
    )
