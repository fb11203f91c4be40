"""Everything a training run needs before its first step, in the order that keeps mistakes cheap:
settings that cannot work are refused before JAX starts; the cluster is joined before the
backend starts; the plan is printed and checked against device memory before anything is
allocated; the checkpoint folder is locked before anything in it is touched; a checkpoint is
resumed only if it is intact and saved by compatible settings; then the step is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from rich.console import Console

from mlsys_jax import distributed
from mlsys_jax.analysis.memory import check_fit, plan_memory
from mlsys_jax.comm.grad_sync import default_slice_size, preset_slice_size
from mlsys_jax.comm.grad_sync import describe as describe_sync
from mlsys_jax.mesh import MeshError, make_mesh, simulate_cpu_devices
from mlsys_jax.models import hf, registry
from mlsys_jax.models.base import LanguageModel
from mlsys_jax.parallel import Plan, PlanError, resolve_mesh, rules
from mlsys_jax.parallel.memory import human_bytes
from mlsys_jax.parallel.pipeline import Schedule, ScheduleError, check_layers, make_schedule
from mlsys_jax.tokenizer import Tokenizer, load_tokenizer
from mlsys_jax.train import data as data_lib
from mlsys_jax.train.checkpoint import Checkpointer, CheckpointError
from mlsys_jax.train.config import (
    RunConfig,
    compare_settings,
    describe_changes,
    model_overrides,
    run_settings,
    tokenizer_spec,
)
from mlsys_jax.train.lock import FolderLock
from mlsys_jax.train.metrics import JsonlWriter
from mlsys_jax.train.optim import OptimConfig, adamw, schedule
from mlsys_jax.train.report import make_console, plan_table
from mlsys_jax.train.state import TrainState, abstract_state, init_state
from mlsys_jax.train.step import TrainStep, check_batch, check_grad_sync_mesh, make_eval_step, make_train_step


@dataclasses.dataclass
class Run:
    """A run ready to train: its plan, model, data, checkpoints and compiled step, and the state
    it starts from."""

    cfg: RunConfig
    console: Console
    primary: bool
    cluster: distributed.Cluster | None
    plan: Plan
    model: LanguageModel
    optimizer: optax.GradientTransformation
    tokenizer: Tokenizer
    step_fn: TrainStep
    compiled: Any
    eval_fn: Any
    dataset: Any
    val: list[dict[str, np.ndarray]]
    ckpt: Checkpointer
    lock: FolderLock | None
    settings: dict[str, Any]
    state: TrainState
    data_state: dict[str, Any] | None
    start: int
    flops_per_token: float
    compile_s: float
    log: JsonlWriter

    @property
    def peak_flops(self) -> float | None:
        return self.plan.device.peak_bf16_flops if self.plan.device is not None else None

    def say(self, *parts: Any) -> None:
        if self.primary:
            self.console.print(*parts, soft_wrap=all(isinstance(p, str) for p in parts))

    def close(self, *, quiet: bool = False) -> None:
        """Finish any save in flight, then let go of the folder. With ``quiet`` (an error is
        already on its way out) a failing save does not replace it."""
        try:
            self.ckpt.close()
        except Exception:
            if not quiet:
                raise
        finally:
            if self.lock is not None:
                self.lock.release()


def check_settings(cfg: RunConfig) -> tuple[Any, dict[str, int], str, LanguageModel]:
    """The checks that need no devices: the checkpoint folder, the mesh, the strategy, the model."""
    folder = Path(cfg.checkpoint.ckpt_dir).expanduser()
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(
                    f"--ckpt-dir {cfg.checkpoint.ckpt_dir!r}: {parent} is a file, not a "
                    "folder. Fix: give --ckpt-dir a folder path (it is created when missing)."
                )
            break
    preset, sizes, strategy = resolve_mesh(cfg.mesh.mesh, cfg.mesh.strategy, cfg.mesh.sequence_parallel)
    model = registry.build_model(cfg.model.model, **model_overrides(cfg))
    if sizes.get("pipeline", 1) != -1:
        pipeline_schedule(cfg, sizes.get("pipeline", 1), strategy, model)
    pipelined = (
        sizes.get("pipeline", 1) != 1 and rules(strategy, sequence_parallel=cfg.mesh.sequence_parallel).pipelined
    )
    check_grad_sync_mesh(
        cfg.mesh.grad_sync, sizes, pipelined, preset_slice_size(preset), f"--mesh {cfg.mesh.mesh} --strategy {strategy}"
    )
    return preset, sizes, strategy, model


def source_weights(cfg: RunConfig, *, needed: bool = False) -> hf.HFCheckpoint | None:
    """The --init-from-hf folder, checked whole (config, index, shards, every tensor's shape)
    from its headers alone, before any device is used; not when the run has checkpoints to
    resume from (its weights are not read then) unless ``needed``."""
    if cfg.model.init_from_hf is None:
        return None
    folder = Path(cfg.checkpoint.ckpt_dir).expanduser()
    saved = folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())
    if saved and not needed:
        return None
    return hf.open_checkpoint(cfg.model.init_from_hf, **model_overrides(cfg))


def run_tokenizer(cfg: RunConfig, model: LanguageModel) -> Tokenizer:
    """The run's tokenizer, refused when the model's vocabulary cannot hold its ids or when it has
    no end-of-document token to join the corpus with."""
    tokenizer = load_tokenizer(tokenizer_spec(cfg))
    if model.vocab_size < tokenizer.vocab_size:
        raise PlanError(
            f"model {cfg.model.model!r} has vocab_size {model.vocab_size}, smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ({getattr(tokenizer, 'name', 'byte')}). Fix: pick a model with a larger "
            "vocabulary, or the model's own tokenizer."
        )
    if tokenizer.EOS < 0:
        raise PlanError(
            f"tokenizer {getattr(tokenizer, 'name', '')} names no eos_token, which joins the documents of the "
            "corpus. Fix: set eos_token in its tokenizer_config.json."
        )
    return tokenizer


def pipeline_schedule(cfg: RunConfig, stages: int, strategy: str, model: LanguageModel) -> Schedule | None:
    """The run's pipeline schedule (None without a pipeline axis), refusing settings that cannot
    run: a pipeline axis the strategy leaves unused, virtual stages without interleaving, and the
    counts the schedules and the layer split need."""
    m = cfg.mesh
    if stages <= 1:
        if m.virtual_stages > 1:
            raise ScheduleError(
                f"--virtual-stages {m.virtual_stages} needs a pipeline axis; --mesh {m.mesh!r} has none. Fix: a mesh "
                "with pipeline=2 or more (e.g. --mesh pipeline=2,data=4), or drop --virtual-stages."
            )
        return None
    if not rules(strategy).pipelined:
        raise ScheduleError(
            f"--mesh {m.mesh!r} has pipeline={stages}, but strategy {strategy!r} does not cut the layers over it "
            f"(every stage would hold the whole model). Fix: --strategy pp_{strategy}."
        )
    check_layers(model.num_layers, stages, m.virtual_stages)
    return make_schedule(m.schedule, stages, cfg.data.microbatches, m.virtual_stages)


def join_cluster(cfg: RunConfig, sizes: dict[str, int]) -> distributed.Cluster | None:
    """Detect and join the job (before JAX's backend starts), asking for the simulated CPU devices
    this process needs; returns the job joined, or None when running alone."""
    m = cfg.mesh
    explicit = m.coordinator or m.num_processes or m.process_id is not None
    cluster = None if explicit or m.cluster == "off" else distributed.detect_cluster()
    procs = m.num_processes or (cluster.num_processes if cluster else 1)
    if m.simulate_devices is not None:
        simulate_cpu_devices(m.simulate_devices, check=False)
    elif -1 not in sizes.values():
        simulate_cpu_devices(max(1, math.prod(sizes.values()) // procs), check=False)
    return distributed.join(cluster, m.coordinator, m.num_processes, m.process_id)


def build_plan(cfg: RunConfig, preset: Any, sizes: dict[str, int], strategy: str) -> Plan:
    mesh = make_mesh(preset if preset is not None else sizes)
    rest = [name for name, size in sizes.items() if size == -1]
    if rest and cfg.mesh.simulate_devices is None and jax.default_backend() == "cpu" and mesh.shape[rest[0]] == 1:
        raise MeshError(
            f"--mesh {cfg.mesh.mesh!r}: {rest[0]}=-1 ('the rest') came to 1 device, as only one CPU "
            f"device exists. Fix: say how many to simulate with --simulate-devices N, or give "
            f"{rest[0]} a size."
        )
    return Plan(
        mesh,
        rules(strategy, sequence_parallel=cfg.mesh.sequence_parallel),
        device=preset.device if preset is not None else None,
    )


def lock_folder(directory: Path, primary: bool) -> FolderLock | None:
    """Process 0 locks the folder; every process of the job follows its verdict."""
    lock, refusal = None, ""
    if primary:
        lock = FolderLock(directory)
        try:
            lock.acquire(" ".join(shlex.quote(a) for a in sys.argv))
        except CheckpointError as err:
            lock, refusal = None, str(err)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        held = bool(multihost_utils.broadcast_one_to_all(np.int32(lock is not None or not primary)))
        if not held and not refusal:
            refusal = f"{directory} is in use by another run (process 0 of this job could not lock it)"
    if refusal:
        raise CheckpointError(refusal)
    return lock


def restore_or_init(
    cfg: RunConfig,
    ckpt: Checkpointer,
    settings: dict[str, Any],
    plan: Plan,
    model: LanguageModel,
    optimizer: optax.GradientTransformation,
    say: Any,
    source: hf.HFCheckpoint | None = None,
) -> tuple[TrainState, dict[str, Any] | None]:
    """The newest intact checkpoint's state and data position, restored onto this plan, or a fresh
    state when there is none. Damaged steps are named and set aside; a checkpoint of settings
    that change the state's shapes or the data order is refused; allowed changes are named. A
    fresh state takes its parameters from ``source`` when given, each process reading only the
    parts its devices hold."""
    steps = ckpt.all_steps()
    if steps and not cfg.checkpoint.resume:
        raise CheckpointError(
            f"{ckpt.directory} already holds checkpoints up to step {steps[-1]}, and --no-resume "
            "would start over on top of them. Fix: drop --no-resume to continue, or give a "
            "new --ckpt-dir."
        )
    changes: list[Any] = []

    def accept(saved: dict[str, Any]) -> None:
        change = compare_settings(saved, settings)
        if change.refused:
            raise CheckpointError(
                f"the checkpoints in {ckpt.directory} were saved by a different run "
                f"({describe_changes(change.refused)}); resuming would change the state's shapes or the "
                "data order. Fix: rerun with the saved settings, or give a new --ckpt-dir to start afresh."
            )
        changes[:] = change.allowed

    abstract = abstract_state(plan, model.specs, optimizer)
    restored, damaged = ckpt.restore_intact(abstract, accept=accept) if steps else (None, [])
    for d in damaged:
        where = f"; moved to {d.moved_to}, not deleted" if d.moved_to else ""
        fallback = f"resuming from step {restored.step} instead" if restored else "no intact checkpoint is left"
        say(f"[yellow]checkpoint step {d.step} in {ckpt.directory} is damaged ({d.reason}); {fallback}{where}")
    if restored is None and cfg.model.init_from_hf is not None:
        source = source or source_weights(cfg, needed=True)
        assert source is not None
        params = hf.load_params(source, model.specs, plan.param_shardings(model.specs))
        reads = source.tensors.reads
        say(
            f"initialized from {source.folder}: {len(reads.boxes)} slices, {human_bytes(reads.nbytes)} read by "
            "this process"
        )
        return init_state(plan, model.specs, optimizer, cfg.data.seed, params=params), None
    if restored is None:
        return init_state(plan, model.specs, optimizer, cfg.data.seed), None
    say(f"resumed from step {restored.step} in {ckpt.directory}")
    if changes:
        say(f"settings changed since that checkpoint (allowed): {describe_changes(tuple(changes))}")
    return restored.state, restored.data_state


def set_up(cfg: RunConfig, console: Console | None = None) -> Run:
    """Prepare the run as configured (see the module's docstring for the order)."""
    preset, sizes, strategy, model = check_settings(cfg)
    source = source_weights(cfg)
    tokenizer = run_tokenizer(cfg, model)
    cluster = join_cluster(cfg, sizes)
    primary = distributed.is_primary()
    console = console or make_console()

    def say(*parts: Any) -> None:
        if primary:
            console.print(*parts, soft_wrap=all(isinstance(p, str) for p in parts))

    detected = cluster or distributed.Cluster("none detected", 1, 0)
    say(detected.describe(jax.local_device_count()))

    plan = build_plan(cfg, preset, sizes, strategy)
    d, loop = cfg.data, cfg.loop
    opt_cfg = OptimConfig(lr=cfg.optimizer.lr, warmup_steps=cfg.optimizer.warmup, total_steps=loop.steps)
    optimizer = adamw(opt_cfg, model.specs)
    check_batch(plan, d.batch, d.microbatches)
    pipeline = pipeline_schedule(cfg, plan.axis_sizes.get("pipeline", 1), strategy, model)
    mem = plan_memory(plan, model, optimizer, d.batch, d.seq, d.microbatches, pipeline, cfg.mesh.pipeline_stash)
    say(plan_table(plan, model, mem, cfg.mesh.mesh, note=f"{jax.process_count()} process(es)"))
    if pipeline is not None:
        say(f"pipeline schedule {pipeline.name!r} ({pipeline.ticks} ticks per step):")
        say(str(pipeline))
    if loop.force and mem.fits is False:
        say(
            f"[yellow]--force: starting although {human_bytes(mem.total)} per device exceeds the "
            f"{human_bytes(mem.hbm or 0)} a device has"
        )
    elif not loop.force:
        check_fit(mem, f"model {cfg.model.model!r} with batch {d.batch} x {d.seq} on {plan.describe_mesh()}", cfg)

    corpus = data_lib.load_corpus(None if d.data is None else [d.data], tokenizer=tokenizer)
    step_fn = make_train_step(
        model,
        plan,
        optimizer,
        microbatches=d.microbatches,
        lr_schedule=schedule(opt_cfg),
        guard=loop.on_nan,
        schedule=pipeline,
        pipeline_stash=cfg.mesh.pipeline_stash,
        pipeline_weights=cfg.mesh.pipeline_weights,
        grad_sync=cfg.mesh.grad_sync,
        sync_slice=preset_slice_size(preset),
    )
    rows = data_lib.local_rows(step_fn.batch_shardings["inputs"], d.batch, d.seq)
    dataset = data_lib.train_dataset(corpus.train, seq_len=d.seq, global_batch=d.batch, seed=d.seed, rows=rows)
    val = data_lib.val_batches(
        corpus.val, seq_len=d.seq, global_batch=d.batch, num_batches=loop.eval_batches, rows=rows
    )
    say(
        f"data: {corpus.train_files} training files ({len(corpus.train):,} tokens), "
        f"{corpus.val_files} validation files ({len(corpus.val):,} tokens)"
    )

    folder = Path(cfg.checkpoint.ckpt_dir).expanduser().resolve()
    lock = lock_folder(folder, primary)
    try:
        ckpt = Checkpointer(folder, save_every=cfg.checkpoint.ckpt_every, keep=cfg.checkpoint.keep)
        settings = run_settings(cfg)
        state, data_state = restore_or_init(cfg, ckpt, settings, plan, model, optimizer, say, source)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    start = int(state.step)
    if start >= loop.steps:
        say(
            f"nothing to train: the checkpoint is at step {start} and --steps is {loop.steps} "
            "(raise --steps to train on)"
        )
    flops = model.flops_per_token(d.seq)
    t0 = time.perf_counter()
    compiled = step_fn.fn.lower(*step_fn.abstract_args(d.batch, d.seq, state)).compile()
    compile_s = time.perf_counter() - t0
    say(f"compiled the train step in {compile_s:.1f} s; {flops / 1e6:,.1f} MFLOP per token")
    for op, choice in model.kernel_choices(d.batch, d.seq).items():
        say(f"{op} kernel: {choice}")
    if cfg.mesh.grad_sync != "xla":
        data = plan.axis_sizes.get("data", 1)
        slice_size = preset_slice_size(preset) or default_slice_size(data)
        say(f"gradient sync: {describe_sync(cfg.mesh.grad_sync, data, slice_size)}")
    log = JsonlWriter(ckpt.directory / "metrics.jsonl", enabled=primary)
    run = Run(
        cfg,
        console,
        primary,
        cluster,
        plan,
        model,
        optimizer,
        tokenizer,
        step_fn,
        compiled,
        make_eval_step(model, plan, optimizer, pipeline),
        dataset,
        val,
        ckpt,
        lock,
        settings,
        state,
        data_state,
        start,
        flops,
        compile_s,
        log,
    )
    try:
        log.write(
            {
                "event": "start",
                "step": start,
                "strategy": plan.rules.name,
                "mesh": cfg.mesh.mesh,
                "devices": plan.num_devices,
                "processes": jax.process_count(),
                "cluster": detected.detector,
                "flops_per_token": flops,
                "compile_s": compile_s,
                "settings": settings,
            }
        )
    except BaseException:
        run.close(quiet=True)
        raise
    return run
