"""The step loop: dispatch ahead, read metrics late, never train on or save a non-finite state,
and stop cleanly when asked.

Each step is dispatched as soon as the previous one is; while it runs the host loads the next
batch onto the devices and then reads the metrics of the step before (every ``metrics_every``
steps; in between it only waits for that step to finish, so no more than one step is queued
behind the running one), so the devices never wait for the host. The step checks for non-finite values on device
(see ``train.step``), so reading late loses nothing: with ``--on-nan stop`` the state stays the
last good one until the host notices. ``--sync-every-step`` waits for each step's metrics before
dispatching the next: the old way, kept so a benchmark can show the difference.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any

import jax

from mlsys_jax.train import data as data_lib
from mlsys_jax.train import integrity
from mlsys_jax.train.checkpoint import CheckpointWriteError
from mlsys_jax.train.evaluate import evaluate
from mlsys_jax.train.metrics import model_flops_utilization
from mlsys_jax.train.preemption import StopRequests
from mlsys_jax.train.reporting import Reporter
from mlsys_jax.train.setup import Run
from mlsys_jax.train.step import TrainStep


class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was not finite and the run was told to stop."""


@dataclasses.dataclass
class Pending:
    """A dispatched step whose metrics have not been read yet."""

    step: int
    metrics: dict[str, jax.Array]
    digest: int
    data_state: dict[str, Any]


@dataclasses.dataclass
class Outcome:
    """What the loop saw: losses, the step it ended at, why it ended early, steps it skipped."""

    first_loss: float | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    end: int = 0
    stopped_by: str | None = None
    skipped: list[int] = dataclasses.field(default_factory=list)


class StepLoop:
    """One pass of the loop over a prepared ``Run`` (see the module's docstring)."""

    def __init__(self, run: Run, reporter: Reporter, stops: StopRequests) -> None:
        self.run, self.reporter, self.stops = run, reporter, stops
        self.cfg = run.cfg
        self.state = run.state
        self.pending: collections.deque[Pending] = collections.deque()
        self.outcome = Outcome(end=run.start)
        self.last_good: tuple[int, dict[str, Any] | None] = (run.start, run.data_state)
        self.last_read = time.perf_counter()
        self.extra: dict[int, dict[str, Any]] = {}

    # ---- metrics, read late -----------------------------------------------------------------
    def drain(self, keep: int = 0) -> None:
        """Read and report every pending step but the newest ``keep``."""
        ready = [self.pending.popleft() for _ in range(max(len(self.pending) - keep, 0))]
        if not ready:
            return
        values = jax.device_get([p.metrics for p in ready])
        now = time.perf_counter()
        per_step = (now - self.last_read) / len(ready)
        self.last_read = now
        for entry, metrics in zip(ready, values):
            self.report(entry, metrics, per_step)

    def report(self, entry: Pending, metrics: dict[str, Any], step_time: float) -> None:
        run, loss = self.run, float(metrics["loss"])
        finite = bool(metrics.get("finite", math.isfinite(loss) and math.isfinite(float(metrics["grad_norm"]))))
        if not finite and self.cfg.loop.on_nan == "stop":
            self.diverged(entry.step, metrics)
        tokens_per_s = float(metrics["tokens"]) / max(step_time, 1e-9)
        mfu = model_flops_utilization(tokens_per_s, run.flops_per_token, run.peak_flops, run.plan.num_devices)
        record = {
            "step": entry.step,
            "loss": loss,
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "step_time": step_time,
            "data": entry.digest,
        }
        if not finite:
            record["skipped"] = True
            self.outcome.skipped.append(entry.step)
            self.reporter.say(
                f"[yellow]step {entry.step}: loss {loss:.4g}, gradient norm "
                f"{float(metrics['grad_norm']):.4g}: not finite, update skipped"
            )
        else:
            self.outcome.first_loss = loss if self.outcome.first_loss is None else self.outcome.first_loss
            self.outcome.last_loss = loss
        record.update(self.extra.pop(entry.step, {}))
        self.last_good = (entry.step, entry.data_state)
        self.reporter.step(record)

    def diverged(self, step: int, metrics: dict[str, Any]) -> None:
        """Save the last good state (the device kept it) and stop with one message."""
        good, data_state = self.last_good
        self.pending.clear()
        ckpt = self.run.ckpt
        if good in ckpt.all_steps() or good == ckpt.pending:
            saved = f"its checkpoint is in {ckpt.directory}"
        elif good > self.run.start and data_state is not None:
            self.save(good, force=True)
            saved = f"saved it in {ckpt.directory}"
        else:
            saved = "nothing to save: no step had completed"
        self.outcome.end = good
        raise TrainingDiverged(
            f"step {step}: the loss is {float(metrics['loss']):.4g} and the gradient norm "
            f"{float(metrics['grad_norm']):.4g}; training stopped with the state of step {good} ({saved}). "
            f"Fix: lower --lr (now {self.cfg.optimizer.lr:g}) or lengthen --warmup, then run the same command "
            "to resume from there; or pass --on-nan skip to drop such steps."
        )

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, step: int, *, force: bool = False) -> bool:
        """Save the state as step ``step`` once it is checked on device: finite, and at that step."""
        if not force and step % self.run.ckpt.save_every:
            return False
        finite, prints = integrity.inspect(self.state)
        at = int(self.state.step)
        if not finite or at != step:
            raise CheckpointWriteError(
                f"refusing to save step {step}: the state is at step {at} and "
                f"{'holds only finite values' if finite else 'holds non-finite values'}"
            )
        data_state = self.last_good[1] if self.last_good[0] == step else None
        if data_state is None:
            raise CheckpointWriteError(f"refusing to save step {step}: its data position is unknown")
        return self.run.ckpt.save(step, self.state, data_state, self.run.settings, force=force, fingerprints=prints)

    # ---- the loop ----------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        return evaluate(self.run, self.state.params)

    def __call__(self) -> Outcome:
        run, cfg = self.run, self.cfg
        steps, every = cfg.loop.steps, cfg.loop.metrics_every
        batches = data_lib.iterator(run.dataset, run.data_state)

        def fetch() -> tuple[int, Any, dict[str, Any]]:
            host = next(batches)
            return (
                data_lib.batch_digest(host),
                data_lib.to_global(host, run.step_fn.batch_shardings, cfg.data.batch),
                batches.get_state(),
            )

        upcoming = fetch() if run.start < steps else None
        guarded = run.step_fn.guard is not None
        for step in range(run.start, steps):
            assert upcoming is not None
            digest, batch, data_state = upcoming
            done = step + 1
            args = (self.state, batch, TrainStep.step_number(step)) if guarded else (self.state, batch)
            self.state, metrics = run.compiled(*args)
            upcoming = fetch() if done < steps else None  # the next batch loads while this step runs
            self.pending.append(Pending(done, metrics, digest, data_state))
            stop = self.stops.requested(done)
            if done % cfg.loop.eval_every == 0 or done == steps:
                self.drain(keep=1)
                self.extra[done] = {"val_loss": self.evaluate()}
                self.outcome.val_loss = self.extra[done]["val_loss"]
            due = stop or done % run.ckpt.save_every == 0 or done == steps
            if cfg.loop.sync_every_step or due:
                self.drain()
            elif done % every == 0:
                self.drain(keep=1)
            elif len(self.pending) > 1:
                # At most one step queued behind the running one: enough to keep the devices busy,
                # and a bounded queue (of batches, metrics, and collectives on a shared host).
                jax.block_until_ready(self.pending[-2].metrics["loss"])
            if due:
                self.save(done, force=True)
            self.outcome.end = done
            if stop:
                run.ckpt.wait()
                self.outcome.stopped_by = self.stops.name
                self.reporter.say(
                    f"{self.stops.name} received: saved step {done} in {run.ckpt.directory}; "
                    "run the same command to resume from it"
                )
                break
        self.drain()
        run.state = self.state
        return self.outcome


def run_steps(run: Run, reporter: Reporter, stops: StopRequests) -> Outcome:
    """Train from ``run.start`` to ``--steps`` (or until stopped); ``run.state`` ends as the
    state of the last step."""
    return StepLoop(run, reporter, stops)()
