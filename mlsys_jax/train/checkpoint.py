"""Checkpoints through orbax's ``CheckpointManager``: the train state, the data iterator's
position and the run's settings, saved asynchronously every N steps, last K kept.

A step appears only once orbax has finished writing it (it writes to a temporary folder and
renames), so a run killed mid-save restores the step before. Restoring takes the target
shardings from the caller's plan: a checkpoint saved on one mesh loads onto any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from mlsys_jax.train.state import TrainState


class CheckpointError(ValueError):
    """A checkpoint folder that does not belong to this run."""


@dataclasses.dataclass
class Restored:
    state: TrainState
    data_state: dict[str, Any]
    meta: dict[str, Any]
    step: int


class Checkpointer:
    """Save and restore (state, data-iterator state, run settings) under one folder."""

    def __init__(self, directory: str | Path, *, save_every: int = 50, keep: int = 3,
                 async_save: bool = True) -> None:
        if save_every < 1 or keep < 1:
            raise CheckpointError(f"need save_every >= 1 and keep >= 1, got {save_every} and {keep}")
        self.directory = Path(directory).expanduser().resolve()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any],
             meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving if ``step`` is a multiple of ``save_every`` (or ``force``); returns
        whether it did. The write finishes in the background; ``wait`` blocks for it."""
        if not force and step % self.save_every:
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> Restored:
        """Load a step (the newest by default) into the shardings of ``abstract_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return Restored(TrainState(*out["state"]), dict(out["data"]), dict(out["meta"]), step)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The run settings saved with a step, without touching arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait(self) -> None:
        """Block until any save in flight has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """Refuse to resume a run whose settings differ from the ones the checkpoint was saved with."""
    keys = sorted(set(saved) | set(current))
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        shown = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diffs)
        raise CheckpointError(
            f"the checkpoints in {directory} were saved by a different run ({shown}). "
            "Fix: rerun with the saved settings, or give a new --ckpt-dir to start afresh."
        )
