"""Step time predicted from an ``Analysis`` and the hardware a mesh preset describes.

- **compute**: the model's FLOPs per device (``flops_per_token`` times the tokens a device's share
  of the batch holds, a third more for each forward the step recomputes: ``Analysis.recomputes``)
  at the device's peak;
- **memory**: the compiled step's memory traffic, every loop counted by its trips
  (``hlo_cost``), at the device's HBM bandwidth (XLA:CPU's program: an upper bound where an
  accelerator compiler fuses more);
- **communication**: every collective, each execution ``latency * ring steps + traffic /
  bandwidth`` over the slowest link among the mesh axes it spans (``cost.ring_steps``);
- **step**: without overlap, the slower of compute and memory plus communication; with perfect
  overlap, the slowest of the three. A pipeline's devices idle for its bubble share of the step.

How the parts combine is the hardware's ``Execution``: an accelerator's roofline by default (the
slower of compute and memory hides the other, the whole bubble is idle time, nothing else). A
host whose simulated devices share a few CPU cores has it measured by microbenchmarks instead
(``analysis.calibration``: how much compute and memory time overlap, how much of the bubble an
idle device's cores give back, what launching a step costs, what first touching the step's
fresh temporary buffer costs); its preset is a ``HostPreset``.

MFU is the model FLOPs of a step over what the devices could do in the predicted time.
"""

from __future__ import annotations

import dataclasses

from mlsys_jax.analysis.compiled_step import Analysis, CollectiveRow
from mlsys_jax.analysis.cost import ring_steps, slowest_link
from mlsys_jax.comm.models import cost as comm_cost
from mlsys_jax.comm.models import time_s
from mlsys_jax.meshes import Link, MeshPreset, load_preset


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a device's parts of a step combine. The defaults are an accelerator's roofline.

    ``overlap``: the share of the shorter of compute and memory time hidden behind the longer (1:
    the slower one alone counts; 0: they add up). ``bubble_share``: the share of a pipeline's
    bubble the step pays (1: idle stages' time is lost; 0: idle devices' cores go to busy ones,
    as when simulated devices share a host). ``overhead_s``: fixed seconds per step (launching
    the program on every device). ``fresh_bandwidth``: bytes/s at which a step's temporary
    buffer is first touched, where every execution gets it fresh from the operating system
    (page faults, as XLA:CPU's does); None where the allocator keeps it (an accelerator)."""

    overlap: float = 1.0
    bubble_share: float = 1.0
    overhead_s: float = 0.0
    fresh_bandwidth: float | None = None


@dataclasses.dataclass(frozen=True)
class HostPreset(MeshPreset):
    """A mesh preset that also says how its hardware combines a step's parts (what a calibrated
    host gives, ``analysis.calibration.Calibration.preset``)."""

    execution: Execution = dataclasses.field(default_factory=Execution)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Seconds per step by part, and what they add up to."""

    compute_s: float
    memory_s: float
    comm_s: float
    bubble: float
    model_flops: float
    tokens: int
    devices: int
    peak_flops: float
    execution: Execution = dataclasses.field(default_factory=Execution)
    #: Seconds to first touch the step's fresh temporary buffer (``Execution.fresh_bandwidth``),
    #: counted with the memory time.
    fresh_s: float = 0.0

    @property
    def busy_s(self) -> float:
        """Compute and memory time as the hardware combines them (``Execution.overlap``)."""
        memory = self.memory_s + self.fresh_s
        slow, fast = max(self.compute_s, memory), min(self.compute_s, memory)
        return slow + (1 - self.execution.overlap) * fast

    @property
    def idle_factor(self) -> float:
        """What the pipeline's bubble stretches the step by."""
        return 1 / (1 - self.execution.bubble_share * self.bubble)

    @property
    def serial_s(self) -> float:
        """The step with no overlap of communication and computation."""
        return (self.busy_s + self.comm_s) * self.idle_factor + self.execution.overhead_s

    @property
    def overlapped_s(self) -> float:
        """The step with communication hidden behind computation as far as it can be."""
        return max(self.busy_s, self.comm_s) * self.idle_factor + self.execution.overhead_s

    def mfu(self, overlapped: bool = False) -> float:
        step = self.overlapped_s if overlapped else self.serial_s
        return self.model_flops / (self.devices * self.peak_flops * step)

    def tokens_per_s(self, overlapped: bool = False) -> float:
        return self.tokens / (self.overlapped_s if overlapped else self.serial_s)


def row_time(row: CollectiveRow, link: Link) -> float:
    """Seconds for one execution of a collective over ``link`` (alpha-beta): XLA's as its ring
    algorithm, a ``grad_sync``'s by that algorithm's own steps and bytes (``comm.models``)."""
    if row.traffic_bytes == 0:
        return 0.0
    if row.algorithm != "xla":
        c = comm_cost(row.algorithm, row.group_size, row.payload_bytes, inner=row.slice_size)
        return time_s(c, link.latency, 1.0 / link.bandwidth)
    return link.latency * ring_steps(row.kind, row.group_size) + row.traffic_bytes / link.bandwidth


def link_for(preset: MeshPreset, axes: tuple[str, ...]) -> Link:
    """The link a collective over ``axes`` crosses on ``preset``: the slowest among the axes the
    preset names, or its slowest link when it names none of them."""
    named = [preset.link_of(a) for a in axes if a in {ax.name for ax in preset.axes}]
    return slowest_link(named or list(preset.links.values()))


def predict(
    analysis: Analysis, hardware: str | MeshPreset | None = None, execution: Execution | None = None
) -> Prediction:
    """The predicted step of ``analysis`` on the hardware of a mesh preset: the analysis's own
    when its mesh was one, else ``hardware`` (its device, and each axis's link where the preset
    names that axis, its slowest link otherwise). The parts combine as ``execution`` says, else
    as a ``HostPreset``'s own execution says, else as an accelerator's roofline."""
    name = hardware if hardware is not None else analysis.hardware
    if name is None:
        raise ValueError(
            f"plan {analysis.strategy!r} on {analysis.mesh} names no hardware. Fix: pass a preset, "
            "e.g. predict(analysis, 'gpu-h100x8'), or analyze on a preset mesh."
        )
    preset = load_preset(name) if isinstance(name, str) else name
    tokens = analysis.batch * analysis.seq
    model_flops = analysis.flops_per_token * tokens
    device = preset.device
    c = analysis.compiled
    bytes_accessed = (c.bytes_per_step or c.bytes_accessed) if c is not None else 0.0
    temp_bytes = analysis.compiled.temp_bytes if analysis.compiled is not None else 0
    comm = sum(r.count * row_time(r, link_for(preset, r.axes)) for r in analysis.collectives)
    if execution is None:
        execution = preset.execution if isinstance(preset, HostPreset) else Execution()
    return Prediction(
        compute_s=model_flops * (1 + analysis.recomputes / 3) / analysis.devices / device.peak_bf16_flops,
        memory_s=bytes_accessed / device.hbm_bandwidth,
        comm_s=comm,
        bubble=analysis.bubble,
        model_flops=model_flops,
        tokens=tokens,
        devices=analysis.devices,
        peak_flops=device.peak_bf16_flops,
        execution=execution,
        fresh_s=temp_bytes / execution.fresh_bandwidth if execution.fresh_bandwidth else 0.0,
    )
