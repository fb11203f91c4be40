"""The training run behind ``recipes/train_lm.py``: settings in, a trained, checkpointed model out.

Order matters at the start: devices are simulated and the cluster joined before JAX touches a
device; the plan is checked and printed before anything compiles; a checkpoint is resumed only
if it was saved by the same settings.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlsys_jax import distributed
from mlsys_jax.mesh import make_mesh, simulate_cpu_devices
from mlsys_jax.models import registry
from mlsys_jax.models.base import ConfigError
from mlsys_jax.parallel import Plan, PlanError, resolve_mesh, rules
from mlsys_jax.serve.generate import generate
from mlsys_jax.train import data as data_lib
from mlsys_jax.train.checkpoint import Checkpointer, CheckpointError, check_compatible
from mlsys_jax.train.metrics import JsonlWriter, model_flops_utilization
from mlsys_jax.train.optim import OptimConfig, adamw, schedule
from mlsys_jax.train.report import make_console, plan_table
from mlsys_jax.train.state import abstract_state, init_state
from mlsys_jax.train.step import check_batch, make_eval_step, make_train_step

PROMPTS = ("def ", "import ", "class ", "    return ")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Train a Llama-family model on text across a device mesh, checkpointing as it goes."""

    mesh: str = "cpu-8"
    """Mesh preset name (cpu-8, gpu-h100x8, ...) or axis sizes such as 'data=2,fsdp=2,tensor=2'."""
    strategy: str | None = None
    """Rule preset: dp, fsdp, tp, dp_tp, dp_fsdp, fsdp_tp, dp_fsdp_tp (default: the preset's)."""
    model: str = "small"
    """Model as family:preset (llama:7b) or a Llama preset: tiny, small, 125m, 1b, 7b, 8b, 70b."""
    steps: int = 300
    """Optimizer steps to train in all (a resumed run continues up to this)."""
    batch: int = 16
    """Global batch in sequences."""
    seq: int = 128
    """Sequence length in tokens (bytes)."""
    lr: float = 3e-3
    """Peak learning rate (linear warmup, then cosine to a tenth)."""
    warmup: int = 20
    """Warmup steps."""
    microbatches: int = 1
    """Split each batch into this many microbatches and accumulate gradients."""
    data: str | None = None
    """A text file or folder of them (default: the Python standard library's .py files)."""
    ckpt_dir: str = "runs/train_lm"
    """Where checkpoints and metrics.jsonl go."""
    ckpt_every: int = 50
    """Save a checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """How many checkpoints to keep."""
    resume: bool = True
    """Continue from the newest complete checkpoint in --ckpt-dir when there is one."""
    simulate_devices: int | None = None
    """CPU devices to simulate (default: as many as the mesh needs)."""
    eval_every: int = 100
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = 4
    """Validation batches per evaluation."""
    sample_tokens: int = 64
    """Tokens to sample after training for each prompt (0: no samples)."""
    temperature: float = 0.8
    """Sampling temperature (0: greedy)."""
    seed: int = 0
    """Seed of the initialization and the data order."""
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
    sequence_parallel: bool = False
    """Shard activations' sequence dim over the 'sequence' mesh axis."""
    coordinator: str | None = None
    """Multi-process: coordinator host:port (with --num-processes and --process-id)."""
    num_processes: int | None = None
    """Multi-process: how many processes."""
    process_id: int | None = None
    """Multi-process: this process's index."""
    progress: bool = True
    """Show a live progress bar."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq", "microbatches", "ckpt_every", "keep", "eval_every",
                     "eval_batches"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be at least 1, got {getattr(self, name)}. Fix: pass "
                                 f"{flag} 1 or more (evaluation and checkpoints also run at the end).")
        for name in ("warmup", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} cannot be negative, got {getattr(self, name)}")


@dataclasses.dataclass
class RunResult:
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    start_step: int
    final_step: int
    samples: list[str]
    metrics_path: Path


#: Run flags that set a field of the model's config, where its family's config has that field.
MODEL_FLAGS = ("dtype", "remat", "attention_impl", "norm_impl", "loss_impl")


def model_overrides(cfg: RunConfig) -> dict[str, Any]:
    """The model config fields the run's flags set. A flag the family's config has no field for
    is refused when it is not left at its default."""
    family, _ = registry.parse_model(cfg.model)
    fields = {f.name for f in dataclasses.fields(family.config)}
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    out = {}
    for name in MODEL_FLAGS:
        value = getattr(cfg, name)
        if name in fields:
            out[name] = value
        elif value != defaults[name]:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to model {cfg.model!r}: the "
                              f"{family.name!r} family's config has no {name!r} field. Fix: drop the flag.")
    return out


def run_meta(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must agree with to be resumed (what shapes the state and data)."""
    model = dataclasses.asdict(registry.get_config(cfg.model))
    return {"model": cfg.model, "model_config": model, "batch": cfg.batch, "seq": cfg.seq,
            "seed": cfg.seed, "data": cfg.data, "microbatches": cfg.microbatches}


def restore_or_init(ckpt: Checkpointer, meta: dict[str, Any], cfg: RunConfig, plan: Plan,
                    model: Any, optimizer: Any) -> tuple[Any, dict[str, Any] | None]:
    """The newest complete checkpoint's state and data position, restored onto this plan, or a
    fresh state when there is none. Refuses a checkpoint of other settings, and refuses to
    start over on top of one unless told to resume."""
    latest = ckpt.latest_step()
    if latest is None:
        return init_state(plan, model.specs, optimizer, cfg.seed), None
    if not cfg.resume:
        raise CheckpointError(
            f"{ckpt.directory} already holds checkpoints up to step {latest}, and --no-resume "
            "would start over on top of them. Fix: drop --no-resume to continue, or give a "
            "new --ckpt-dir."
        )
    check_compatible(ckpt.read_meta(latest), meta, ckpt.directory)
    restored = ckpt.restore(abstract_state(plan, model.specs, optimizer), latest)
    return restored.state, restored.data_state


def train(cfg: RunConfig, console: Console | None = None) -> RunResult:
    """Run training as configured; returns the losses it saw and the samples it drew."""
    preset, sizes, strategy = resolve_mesh(cfg.mesh, cfg.strategy, cfg.sequence_parallel)
    procs = cfg.num_processes or 1
    wanted = cfg.simulate_devices or max(1, math.prod(sizes.values()) // procs)
    simulate_cpu_devices(wanted, check=False)
    if cfg.coordinator or cfg.num_processes or cfg.process_id is not None:
        distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    primary = distributed.is_primary()
    console = console or make_console()
    say = console.print if primary else (lambda *a, **k: None)

    mesh = make_mesh(preset if preset is not None else sizes)
    plan = Plan(mesh, rules(strategy, sequence_parallel=cfg.sequence_parallel),
                device=preset.device if preset is not None else None)
    model = registry.build_model(cfg.model, **model_overrides(cfg))
    tokenizer = data_lib.ByteTokenizer()
    if model.vocab_size < tokenizer.vocab_size:
        raise PlanError(
            f"model {cfg.model!r} has vocab_size {model.vocab_size}, smaller than the byte "
            f"tokenizer's {tokenizer.vocab_size}. Fix: pick a model with a larger vocabulary."
        )
    opt_cfg = OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup, total_steps=cfg.steps)
    optimizer = adamw(opt_cfg, model.specs)
    check_batch(plan, cfg.batch, cfg.microbatches)
    say(plan_table(plan, model, optimizer, cfg.mesh, note=f"{jax.process_count()} process(es)"))

    step_fn = make_train_step(model, plan, optimizer, microbatches=cfg.microbatches,
                              lr_schedule=schedule(opt_cfg))
    eval_fn = make_eval_step(model, plan, optimizer)
    rows = data_lib.local_rows(step_fn.batch_shardings["inputs"], cfg.batch, cfg.seq)
    corpus = data_lib.load_corpus(None if cfg.data is None else [cfg.data], tokenizer=tokenizer)
    dataset = data_lib.train_dataset(corpus.train, seq_len=cfg.seq, global_batch=cfg.batch,
                                     seed=cfg.seed, rows=rows)
    val = data_lib.val_batches(corpus.val, seq_len=cfg.seq, global_batch=cfg.batch,
                               num_batches=cfg.eval_batches, rows=rows)
    say(f"data: {corpus.train_files} training files ({len(corpus.train):,} tokens), "
        f"{corpus.val_files} validation files ({len(corpus.val):,} tokens)")

    ckpt = Checkpointer(cfg.ckpt_dir, save_every=cfg.ckpt_every, keep=cfg.keep)
    meta = run_meta(cfg)
    state, data_state = restore_or_init(ckpt, meta, cfg, plan, model, optimizer)
    if data_state is not None:
        say(f"resumed from step {int(state.step)} in {ckpt.directory}")
    start = int(state.step)
    if start >= cfg.steps:
        say(f"nothing to train: the checkpoint is at step {start} and --steps is {cfg.steps} "
            "(raise --steps to train on)")
    batches = data_lib.iterator(dataset, data_state)
    flops = model.flops_per_token(cfg.seq)
    peak = plan.device.peak_bf16_flops if plan.device is not None else None
    t0 = time.perf_counter()
    compiled = step_fn.fn.lower(state, step_fn.abstract_batch(cfg.batch, cfg.seq)).compile()
    compile_s = time.perf_counter() - t0
    say(f"compiled the train step in {compile_s:.1f} s; {flops / 1e6:,.1f} MFLOP per token")
    for op, choice in model.kernel_choices(cfg.batch, cfg.seq).items():
        say(f"{op} kernel: {choice}")
    log = JsonlWriter(ckpt.directory / "metrics.jsonl", enabled=primary)
    log.write({"event": "start", "step": start, "strategy": plan.rules.name, "mesh": cfg.mesh,
               "devices": plan.num_devices, "processes": jax.process_count(),
               "flops_per_token": flops, "compile_s": compile_s})

    def evaluate() -> float | None:
        if not val:
            return None
        total = count = 0.0
        for b in val:
            s, c = eval_fn(state.params, data_lib.to_global(b, step_fn.batch_shardings, cfg.batch))
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    first = last = None
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("MFU {task.fields[mfu]}"), TimeRemainingColumn(),
        console=console, disable=not (cfg.progress and primary), transient=False,
    )
    val_loss = None
    with progress:
        task = progress.add_task("train", total=cfg.steps, completed=start, loss="-", tps="-", mfu="-")
        for step in range(start, cfg.steps):
            host_batch = next(batches)
            t0 = time.perf_counter()
            state, metrics = compiled(state, data_lib.to_global(host_batch, step_fn.batch_shardings, cfg.batch))
            loss = float(metrics["loss"])
            elapsed = time.perf_counter() - t0
            tokens_per_s = float(metrics["tokens"]) / elapsed
            mfu = model_flops_utilization(tokens_per_s, flops, peak, plan.num_devices)
            first = loss if first is None else first
            last = loss
            done = step + 1
            record = {"step": done, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                      "lr": float(metrics["lr"]), "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "step_time": elapsed, "data": data_lib.batch_digest(host_batch)}
            mfu_text = "n/a" if math.isnan(mfu) else f"{mfu:.1%}"
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val_loss = evaluate()
                record["val_loss"] = val_loss
                if primary:
                    progress.console.print(
                        f"step {done}: loss {loss:.3f}, validation loss "
                        f"{'n/a' if val_loss is None else f'{val_loss:.3f}'}, "
                        f"{tokens_per_s:,.0f} tok/s, MFU {mfu_text}")
            log.write(record)
            progress.update(task, completed=done, loss=f"{loss:.3f}", tps=f"{tokens_per_s:,.0f}",
                            mfu=mfu_text)
            ckpt.save(done, state, batches.get_state(), meta, force=done == cfg.steps)
    ckpt.wait()
    if val_loss is None:
        val_loss = evaluate()
    end = int(state.step)
    samples: list[str] = []
    if cfg.sample_tokens > 0:
        outs = generate(model, plan, state.params, [tokenizer.encode(p) for p in PROMPTS],
                        new_tokens=cfg.sample_tokens, temperature=cfg.temperature, seed=cfg.seed)
        samples = [p + tokenizer.decode(o) for p, o in zip(PROMPTS, outs)]
    ckpt.close()
    say(f"steps {start}->{end}: first loss {first if first is None else round(first, 4)}, "
        f"last loss {last if last is None else round(last, 4)}, "
        f"validation loss {val_loss if val_loss is None else round(val_loss, 4)}")
    for s in samples:
        say("[dim]sample:[/dim]", repr(s))
    log.write({"event": "end", "step": end, "first_loss": first, "last_loss": last,
               "val_loss": val_loss, "samples": samples})
    return RunResult(first, last, val_loss, start, end, samples, ckpt.directory / "metrics.jsonl")
