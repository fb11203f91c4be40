"""Checkpoints through orbax's ``CheckpointManager``: the train state, the data iterator's
position, the run's settings and a fingerprint of every state leaf, saved asynchronously every
N steps, last K kept.

A step appears only once orbax has finished writing it (it writes to a temporary folder and
renames), so a run killed mid-save restores the step before. Restoring takes the target
shardings from the caller's plan: a checkpoint saved on one mesh loads onto any other. A step
that fails to restore or whose values do not match their fingerprints is named, moved into
``damaged/`` (never deleted), and the next older one is tried. A save that fails in the
background (a full disk) is reported as one error naming the step and the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mlsys_jax.train import integrity
from mlsys_jax.train.state import TrainState


class CheckpointError(ValueError):
    """A checkpoint folder that does not belong to this run, or cannot be used by it."""


class CheckpointWriteError(RuntimeError):
    """A save that did not complete; the checkpoints before it are intact."""


@dataclasses.dataclass
class Restored:
    state: TrainState
    data_state: dict[str, Any]
    meta: dict[str, Any]
    step: int


@dataclasses.dataclass(frozen=True)
class Damaged:
    """A checkpoint step that could not be used, what was wrong, and where it was moved."""

    step: int
    reason: str
    moved_to: Path | None


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (orbax wraps tensorstore's errors several times)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            break
        err = nxt
    return err


def summarize(err: BaseException, limit: int = 300) -> str:
    """One line saying what went wrong: a disk error by its name, else the innermost message."""
    chain = [err]
    while chain[-1].__cause__ or chain[-1].__context__:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)  # type: ignore[arg-type]
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
            return f"{e.strerror or errno.errorcode.get(e.errno or 0, 'disk error')} ({type(e).__name__})"
    text = " ".join(str(e) for e in chain)
    for marker, meaning in (
        ("No space left", "No space left on device"),
        ("File too large", "File too large"),
        ("Disk quota", "Disk quota exceeded"),
        ("Read-only file system", "Read-only file system"),
    ):
        if marker in text:
            return meaning
    inner = root_cause(err)
    line = " ".join(str(inner).split()) or type(inner).__name__
    return (line[: limit - 3] + "...") if len(line) > limit else line


class _ReportedByCheckpointer(logging.Filter):
    """Drops the tracebacks that orbax (through absl) and asyncio (for its abandoned futures) log
    of a failed background save: ``Checkpointer`` raises the same failure as one message naming
    the step."""

    #: How tensorstore's errors begin (an absl status code), for those raised with no Python frames.
    STATUS = (
        "OUT_OF_RANGE:",
        "RESOURCE_EXHAUSTED:",
        "UNKNOWN:",
        "INTERNAL:",
        "DATA_LOSS:",
        "ABORTED:",
        "FAILED_PRECONDITION:",
        "UNAVAILABLE:",
        "PERMISSION_DENIED:",
        "NOT_FOUND:",
        "CANCELLED:",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[1] is None:
            return True
        _, error, tb = record.exc_info
        from_orbax = tb is not None and any("orbax" in frame.filename for frame in traceback.extract_tb(tb))
        return not (from_orbax or str(error).startswith(self.STATUS))


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_ReportedByCheckpointer())
_unraisable = sys.unraisablehook


def _quiet_after_failed_save(info: Any) -> None:
    """After a background save fails, tensorstore's other writes finish against orbax's closed
    event loop and each reports 'Event loop is closed'; the failure itself is reported once."""
    if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
        return
    _unraisable(info)


sys.unraisablehook = _quiet_after_failed_save


class Checkpointer:
    """Save and restore (state, data-iterator state, run settings) under one folder."""

    def __init__(self, directory: str | Path, *, save_every: int = 50, keep: int = 3, async_save: bool = True) -> None:
        if save_every < 1 or keep < 1:
            raise CheckpointError(f"need save_every >= 1 and keep >= 1, got {save_every} and {keep}")
        self.directory = Path(directory).expanduser().resolve()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.directory} is a file. Fix: give --ckpt-dir a "
                "folder (it is created when missing)."
            )
        self.save_every = save_every
        self.pending: int | None = None
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
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict[str, Any],
        meta: dict[str, Any],
        *,
        force: bool = False,
        fingerprints: dict[str, int] | None = None,
    ) -> bool:
        """Start saving if ``step`` is a multiple of ``save_every`` (or ``force``); returns
        whether it did. The write finishes in the background; ``wait`` blocks for it. A state
        with a non-finite value is refused (``CheckpointWriteError``), never written."""
        if not force and step % self.save_every:
            return False
        if fingerprints is None:
            finite, fingerprints = integrity.inspect(state)
            if not finite:
                raise CheckpointWriteError(f"refusing to save step {step}: the state holds non-finite values")
        self._guarded(self.pending, lambda: self.manager.wait_until_finished())
        self.pending = step
        return self._guarded(
            step,
            lambda: self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                    integrity=ocp.args.JsonSave({"leaves": fingerprints}),
                ),
                force=True,
            ),
        )

    def _guarded(self, step: int | None, action: Callable[[], Any]) -> Any:
        """Run an orbax call; a failure (now or of the save in flight) becomes one error naming
        the step that did not complete and what was wrong."""
        try:
            return action()
        except Exception as err:
            failed = step if step is not None else self.pending
            self.pending = None
            kept = [s for s in self._listed_steps() if failed is None or s < failed]
            before = f"the earlier checkpoints (steps {kept}) are intact" if kept else "no earlier checkpoint exists"
            raise CheckpointWriteError(
                f"saving step {failed} to {self.directory} failed: {summarize(err)}; {before}. Fix: free "
                "disk space or give a --ckpt-dir with room, then run the same command to resume."
            ) from err

    def _listed_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def restore(self, abstract_state: TrainState, step: int | None = None, *, verify: bool = True) -> Restored:
        """Load a step (the newest by default) into the shardings of ``abstract_state``; with
        ``verify``, check every leaf against the fingerprints saved with it."""
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
        state = TrainState(*out["state"])
        if verify:
            saved = self._saved_fingerprints(step)
            finite, now = integrity.inspect(state)
            bad = integrity.mismatches(saved, now) if saved is not None else []
            if bad:
                shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                raise CheckpointError(f"the values of {shown} do not match the fingerprints saved with them")
            if not finite:
                raise CheckpointError("the state holds non-finite values")
        return Restored(state, dict(out["data"]), dict(out["meta"]), step)

    def _saved_fingerprints(self, step: int) -> dict[str, int] | None:
        if not (self.directory / str(step) / "integrity").exists():
            return None  # saved before fingerprints were recorded
        out = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
        return {k: int(v) for k, v in dict(out["integrity"])["leaves"].items()}

    def restore_intact(
        self,
        abstract_state: TrainState,
        *,
        accept: Callable[[dict[str, Any]], None] | None = None,
        move_damaged: bool = True,
    ) -> tuple[Restored | None, list[Damaged]]:
        """The newest step that restores and verifies, trying older ones in turn, and the damaged
        steps passed over (moved into ``damaged/`` so a new save of the same step can be made).
        ``accept(meta)`` may raise to refuse a checkpoint of other settings; that is not damage."""
        damaged: list[Damaged] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
            except Exception as err:  # noqa: BLE001 - a missing or garbled metadata file, whatever orbax raises
                damaged.append(Damaged(step, f"its settings file cannot be read: {summarize(err, 160)}", None))
                continue
            if accept is not None:
                accept(meta)
            try:
                restored = self.restore(abstract_state, step)
            except Exception as err:  # noqa: BLE001 - unreadable arrays or wrong values, whatever orbax raises
                damaged.append(Damaged(step, summarize(err, 200), None))
                continue
            break
        else:
            restored = None
        if move_damaged and damaged:
            if jax.process_index() == 0:
                damaged = [dataclasses.replace(d, moved_to=self._set_aside(d.step)) for d in damaged]
            self.manager.reload()
        return restored, damaged

    def _set_aside(self, step: int) -> Path:
        target = self.directory / "damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(self.directory / str(step)), target)
        return target

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The run settings saved with a step, without touching arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise CheckpointError(f"step {step}'s settings are not a JSON object")
        return dict(meta)

    def wait(self) -> None:
        """Block until any save in flight has been written (raises ``CheckpointWriteError`` if it
        failed)."""
        self._guarded(self.pending, lambda: self.manager.wait_until_finished())
        self.pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # a failed save was already reported by wait
                self.manager.close()
