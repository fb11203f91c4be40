"""A training run's settings in sections (mesh, model, optimizer, data, checkpoint, run), checked
when parsed, and what of them a resumed run may change.

On the command line every field is a flat flag (``--mesh``, ``--lr``, ``--ckpt-dir``); ``--help``
groups them by section.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

from mlsys_jax.models import registry
from mlsys_jax.models.base import ConfigError


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Where the run goes: devices, their mesh, the placement rules and the cluster."""

    mesh: str = "cpu-8"
    """Mesh preset name (cpu-8, gpu-h100x8, ...) or axis sizes such as 'data=2,fsdp=2,tensor=2'."""
    strategy: str | None = None
    """Rule preset: dp, fsdp, tp, dp_tp, dp_fsdp, fsdp_tp, dp_fsdp_tp, or any of them with pp_ in
    front (pp_dp, pp_fsdp_tp, ...: the layers cut into stages over the pipeline axis); pp alone
    pipelines only. Default: the preset's, or the one matching the axes of --mesh sizes."""
    sequence_parallel: bool = False
    """Shard activations' sequence dim over the 'sequence' mesh axis."""
    schedule: Literal["gpipe", "1f1b", "interleaved", "zb"] = "1f1b"
    """Pipeline schedule, when the mesh has a pipeline axis: gpipe, 1f1b, interleaved (1F1B with
    --virtual-stages chunks per device), zb (zero-bubble ZB-H1). Microbatches: --microbatches."""
    virtual_stages: int = 1
    """Model chunks per pipeline device for --schedule interleaved."""
    pipeline_weights: Literal["sharded", "gathered"] = "sharded"
    """A pipeline stage's FSDP-sharded weights: sharded (gathered in every tick that uses them:
    least memory) or gathered (once per step, held whole: no gathers in the ticks)."""
    pipeline_stash: Literal["inputs", "residuals"] = "inputs"
    """What a pipeline forward keeps for its backward: inputs (the backward recomputes the stage:
    least memory) or residuals (no recompute: faster, a stage's activations per microbatch held)."""
    grad_sync: Literal["xla", "ring", "tree", "hierarchical", "ps"] = "xla"
    """How gradients are summed over the data axis: xla (XLA's own all-reduce), or one of ours,
    issued layer by layer in the backward pass: ring (reduce-scatter then all-gather), tree
    (recursive halving-doubling), hierarchical (within each slice of the data axis, then across
    slices), ps (each shard pushed to the device that owns it and pulled back)."""
    simulate_devices: int | None = None
    """CPU devices to simulate (default: as many as the mesh needs)."""
    cluster: Literal["auto", "off"] = "auto"
    """auto: join the job a cluster launcher started (SLURM, Open MPI, TPU pods, Kubernetes), when
    one is detected; off: run alone."""
    coordinator: str | None = None
    """Multi-process by hand: coordinator host:port (with --num-processes and --process-id)."""
    num_processes: int | None = None
    """Multi-process by hand: how many processes."""
    process_id: int | None = None
    """Multi-process by hand: this process's index."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What is trained: the model and how its operations run."""

    model: str = "small"
    """Model as family:preset (llama:7b), a Llama preset (tiny, tiny8, small, 125m, 1b, 7b, 8b, 70b),
    or hf:PATH, a local Hugging Face folder's architecture (its config.json; weights not read)."""
    init_from_hf: str | None = None
    """Start from the weights of a local Hugging Face folder (config.json, *.safetensors): Llama 2/3,
    Mistral or Qwen2. The model is the folder's (leave --model at its default), and so is the
    tokenizer when the folder has a tokenizer.json (--tokenizer to choose another)."""
    dtype: str = "bfloat16"
    """Compute dtype (parameters stay float32)."""
    remat: str = "none"
    """Activation checkpointing per layer: none, full, save_dots."""
    attention_impl: str = "xla"
    """Attention: xla, cudnn (GPU), pallas (best Pallas kernel here; interpreted on CPU),
    pallas_triton, pallas_tpu, auto."""
    norm_impl: str = "xla"
    """RMSNorm: xla, pallas, pallas_triton, pallas_tpu."""
    loss_impl: str = "xla"
    """Cross-entropy: xla (whole logits), fused (chunked linear cross-entropy: best backend
    here), chunked, pallas_triton, pallas_tpu."""
    tp_matmul: Literal["xla", "collective"] = "xla"
    """Tensor-parallel projections: xla (einsums XLA partitions) or collective (ppermute rings
    overlapping the token all-gather and reduce-scatter with the matmuls, sequence split)."""


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW on a warmup-then-cosine schedule."""

    lr: float = 3e-3
    """Peak learning rate (linear warmup, then cosine to a tenth)."""
    warmup: int = 20
    """Warmup steps."""


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The text, its batches and their order."""

    data: str | None = None
    """A text file or folder of them (default: the Python standard library's .py files)."""
    batch: int = 16
    """Global batch in sequences."""
    seq: int = 128
    """Sequence length in tokens (bytes)."""
    microbatches: int = 1
    """Split each batch into this many microbatches and accumulate gradients."""
    seed: int = 0
    """Seed of the initialization and the data order."""
    tokenizer: str | None = None
    """byte (UTF-8 bytes), or a Hugging Face tokenizer.json or its folder. Default: the
    --init-from-hf folder's tokenizer when it has one, else byte."""


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Where the run saves itself, and how often."""

    ckpt_dir: str = "runs/train_lm"
    """Where checkpoints and metrics.jsonl go."""
    ckpt_every: int = 50
    """Save a checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """How many checkpoints to keep."""
    resume: bool = True
    """Continue from the newest intact checkpoint in --ckpt-dir when there is one."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long to train, what to check and report along the way."""

    steps: int = 300
    """Optimizer steps to train in all (a resumed run continues up to this)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is not finite: stop (save the last good state, exit
    non-zero) or skip (drop that update, count it, go on)."""
    metrics_every: int = 1
    """Read the metrics from the devices every this many steps (always one step late, so the
    host keeps dispatching ahead)."""
    sync_every_step: bool = False
    """Wait for each step's metrics before starting the next (slower; for comparison)."""
    force: bool = False
    """Start even when the fit check says the run will not fit in device memory."""
    eval_every: int = 100
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = 4
    """Validation batches per evaluation."""
    sample_tokens: int = 64
    """Tokens to sample after training for each prompt (0: no samples)."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy)."""
    progress: bool = True
    """Show a live progress bar."""
    debug: bool = False
    """Show the Python traceback of an error as well as its message."""


SECTIONS = {
    "mesh": MeshSettings,
    "model": ModelSettings,
    "optimizer": OptimizerSettings,
    "data": DataSettings,
    "checkpoint": CheckpointSettings,
    "loop": LoopSettings,
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Train a language model on text across a device mesh, checkpointing as it goes."""

    mesh: MeshSettings = MeshSettings()
    model: ModelSettings = ModelSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    data: DataSettings = DataSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    loop: LoopSettings = LoopSettings()

    def __post_init__(self) -> None:
        hf_path = self.model.init_from_hf
        if hf_path is not None:
            if self.model.model not in (ModelSettings.model, f"hf:{hf_path}"):
                raise ConfigError(
                    f"--init-from-hf {hf_path} takes the model from that folder's config.json, but --model "
                    f"{self.model.model!r} names another. Fix: drop --model."
                )
            object.__setattr__(self, "model", dataclasses.replace(self.model, model=f"hf:{hf_path}"))
        at_least_one = (
            "steps",
            "batch",
            "seq",
            "microbatches",
            "ckpt_every",
            "keep",
            "eval_every",
            "eval_batches",
            "metrics_every",
            "virtual_stages",
        )
        for name in at_least_one:
            if self.get(name) < 1:
                raise ConfigError(
                    f"{flag(name)} must be at least 1, got {self.get(name)}. Fix: pass "
                    f"{flag(name)} 1 or more (evaluation and checkpoints also run at the end)."
                )
        for name in ("warmup", "sample_tokens"):
            if self.get(name) < 0:
                raise ConfigError(f"{flag(name)} cannot be negative, got {self.get(name)}")
        lr = self.optimizer.lr
        if not math.isfinite(lr) or lr <= 0:
            raise ConfigError(
                f"--lr must be a finite positive number, got {lr}. Fix: pass a learning rate such as 3e-4."
            )
        if not math.isfinite(self.loop.temperature) or self.loop.temperature < 0:
            raise ConfigError(f"--temperature must be finite and not negative, got {self.loop.temperature}")
        if self.mesh.simulate_devices is not None and self.mesh.simulate_devices < 1:
            raise ConfigError(f"--simulate-devices must be at least 1, got {self.mesh.simulate_devices}")

    def get(self, name: str) -> Any:
        """A setting by its flag's field name, whichever section holds it."""
        for section in SECTIONS:
            part = getattr(self, section)
            if name in {f.name for f in dataclasses.fields(part)}:
                return getattr(part, name)
        raise KeyError(name)

    @classmethod
    def of(cls, **flat: Any) -> RunConfig:
        """Build from flat settings as the flags name them: ``RunConfig.of(model="tiny", lr=1e-3)``."""
        parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        owner = {f.name: s for s, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
        for name, value in flat.items():
            if name not in owner:
                raise ConfigError(f"no run setting named {name!r}")
            parts[owner[name]][name] = value
        return cls(**{s: SECTIONS[s](**v) for s, v in parts.items()})

    def flat(self) -> dict[str, Any]:
        """Every setting by name (the flags without their dashes)."""
        return {
            f.name: getattr(getattr(self, s), f.name) for s in SECTIONS for f in dataclasses.fields(getattr(self, s))
        }


#: Run flags that set a field of the model's config, where its family's config has that field.
MODEL_FLAGS = ("dtype", "remat", "attention_impl", "norm_impl", "loss_impl", "tp_matmul")


def model_overrides(cfg: RunConfig) -> dict[str, Any]:
    """The model config fields the run's flags set. A flag the family's config has no field for
    is refused when it is not left at its default."""
    family, _ = registry.parse_model(cfg.model.model)
    fields = {f.name for f in dataclasses.fields(family.config)}
    defaults = ModelSettings()
    out = {}
    for name in MODEL_FLAGS:
        value = getattr(cfg.model, name)
        if name in fields:
            out[name] = value
        elif value != getattr(defaults, name):
            raise ConfigError(
                f"{flag(name)} does not apply to model {cfg.model.model!r}: the "
                f"{family.name!r} family's config has no {name!r} field. Fix: drop the flag."
            )
    return out


#: Settings that only say how to run, not what is computed: never recorded with a checkpoint.
NOT_RECORDED = (
    "simulate_devices",
    "cluster",
    "coordinator",
    "num_processes",
    "process_id",
    "resume",
    "progress",
    "debug",
    "force",
    "ckpt_dir",
    "metrics_every",
    "sync_every_step",
)

#: Recorded settings a resumed run may change: they alter neither the state's shapes nor the order
#: in which the data is read. (``model_config`` is compared field by field below.)
MAY_CHANGE = (
    "steps",
    "lr",
    "warmup",
    "mesh",
    "strategy",
    "sequence_parallel",
    "microbatches",
    "schedule",
    "virtual_stages",
    "pipeline_stash",
    "pipeline_weights",
    "grad_sync",
    "ckpt_every",
    "keep",
    "eval_every",
    "eval_batches",
    "sample_tokens",
    "temperature",
    "on_nan",
    *MODEL_FLAGS,
)


def tokenizer_spec(cfg: RunConfig) -> str | None:
    """The tokenizer the run reads text with: --tokenizer, else the --init-from-hf folder's own
    when it has a tokenizer.json, else None (bytes)."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    hf_path = cfg.model.init_from_hf
    if hf_path is not None and (Path(hf_path).expanduser() / "tokenizer.json").is_file():
        return hf_path
    return None


def run_settings(cfg: RunConfig) -> dict[str, Any]:
    """The run's real settings as recorded beside its checkpoints: every setting that shapes what
    is computed, and the model's config with the run's overrides applied."""
    settings = {k: v for k, v in cfg.flat().items() if k not in NOT_RECORDED}
    settings["tokenizer"] = tokenizer_spec(cfg)
    settings["model_config"] = dataclasses.asdict(registry.get_config(cfg.model.model, **model_overrides(cfg)))
    return settings


@dataclasses.dataclass(frozen=True)
class SettingsChange:
    """How a resumed run's settings differ from the checkpoint's: allowed and refused changes,
    each as (name, saved, now)."""

    allowed: tuple[tuple[str, Any, Any], ...]
    refused: tuple[tuple[str, Any, Any], ...]


def compare_settings(saved: dict[str, Any], now: dict[str, Any]) -> SettingsChange:
    """Sort the differences between saved and current settings into those a resume may make and
    those it may not (they change the state's shapes or the data order)."""
    allowed, refused = [], []
    for key in sorted(set(saved) | set(now)):
        if key == "model_config":
            old, new = saved.get(key) or {}, now.get(key) or {}
            for field in sorted(set(old) | set(new)):
                if old.get(field) != new.get(field):
                    change = (f"model_config.{field}", old.get(field), new.get(field))
                    (allowed if field in MODEL_FLAGS else refused).append(change)
            continue
        if saved.get(key) != now.get(key):
            change = (key, saved.get(key), now.get(key))
            (allowed if key in MAY_CHANGE else refused).append(change)
    return SettingsChange(tuple(allowed), tuple(refused))


def describe_changes(changes: tuple[tuple[str, Any, Any], ...]) -> str:
    return ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in changes)
