"""A whole training run behind ``recipes/train_lm.py``: set up, train, evaluate, sample, report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from mlsys_jax.serve.generate import generate
from mlsys_jax.train.config import RunConfig
from mlsys_jax.train.evaluate import evaluate
from mlsys_jax.train.loop import run_steps
from mlsys_jax.train.preemption import StopRequests
from mlsys_jax.train.reporting import Reporter
from mlsys_jax.train.setup import set_up

PROMPTS = ("def ", "import ", "class ", "    return ")


@dataclasses.dataclass
class RunResult:
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    start_step: int
    final_step: int
    samples: list[str]
    metrics_path: Path
    stopped_by: str | None = None
    skipped: list[int] = dataclasses.field(default_factory=list)


def r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def train(cfg: RunConfig, console: Console | None = None) -> RunResult:
    """Run training as configured; returns the losses it saw and the samples it drew. A stop
    request (SIGTERM, Ctrl-C) ends it early with the last step saved."""
    run = set_up(cfg, console)
    try:
        with (
            Reporter(
                run.console,
                run.log,
                primary=run.primary,
                progress=cfg.loop.progress,
                total=cfg.loop.steps,
                start=run.start,
            ) as reporter,
            StopRequests() as stops,
        ):
            outcome = run_steps(run, reporter, stops)
        metrics_path = run.ckpt.directory / "metrics.jsonl"
        if outcome.stopped_by:
            run.log.write({"event": "stopped", "step": outcome.end, "signal": outcome.stopped_by})
            run.close()
            return RunResult(
                outcome.first_loss,
                outcome.last_loss,
                outcome.val_loss,
                run.start,
                outcome.end,
                [],
                metrics_path,
                outcome.stopped_by,
                outcome.skipped,
            )
        run.ckpt.wait()
        val_loss = outcome.val_loss if outcome.val_loss is not None else evaluate(run, run.state.params)
        samples: list[str] = []
        if cfg.loop.sample_tokens > 0:
            prompts = [run.tokenizer.encode(p) for p in PROMPTS]
            outs = generate(
                run.model,
                run.plan,
                run.state.params,
                prompts,
                new_tokens=cfg.loop.sample_tokens,
                temperature=cfg.loop.temperature,
                seed=cfg.data.seed,
            )
            samples = [p + run.tokenizer.decode(o) for p, o in zip(PROMPTS, outs)]
        end = int(run.state.step)
        skipped = f", {len(outcome.skipped)} step(s) skipped as non-finite" if outcome.skipped else ""
        run.say(
            f"steps {run.start}->{end}: first loss {r4(outcome.first_loss)}, last loss "
            f"{r4(outcome.last_loss)}, validation loss {r4(val_loss)}{skipped}"
        )
        for s in samples:
            run.say("[dim]sample:[/dim]", repr(s))
        run.log.write(
            {
                "event": "end",
                "step": end,
                "first_loss": outcome.first_loss,
                "last_loss": outcome.last_loss,
                "val_loss": val_loss,
                "samples": samples,
                "skipped": outcome.skipped,
            }
        )
        run.close()
        return RunResult(
            outcome.first_loss,
            outcome.last_loss,
            val_loss,
            run.start,
            end,
            samples,
            metrics_path,
            None,
            outcome.skipped,
        )
    except BaseException:
        run.close(quiet=True)
        raise
