"""Preemption: SIGTERM (what a scheduler sends before it takes the machine) and Ctrl-C ask the
run to finish its current step, save it and exit cleanly; a second Ctrl-C exits at once.

In a job of several processes the save must happen at the same step everywhere, so there the
notice goes through JAX's preemption sync (the coordination service picks the step every process
stops at); one process alone just stops after the step it is on.
"""

from __future__ import annotations

import os
import signal
import sys
import types
from typing import Any, Self

import jax

NAMES: dict[int, str] = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


class StopRequests:
    """Catches the signals while installed; ``requested(step)`` says whether to stop after ``step``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = False

    def install(self) -> Self:
        self._multiprocess = jax.process_count() > 1
        # Several processes: JAX's own SIGTERM handler feeds the preemption sync, so leave it be.
        wanted = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if self.received is not None and signum == signal.SIGINT:
            print("\ninterrupted twice: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.received = signum
        print(
            f"\n{NAMES.get(signum, signum)} received: finishing this step, then saving and exiting "
            "(Ctrl-C again exits at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, step: int) -> bool:
        """Whether the run should save and stop after ``step`` (the same answer in every process)."""
        if self._multiprocess:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.received = self.received or signal.SIGTERM
                    return True
            except RuntimeError:  # no preemption service in this JAX job
                pass
            return False
        return self.received is not None

    @property
    def name(self) -> str:
        return NAMES.get(self.received, "a stop request") if self.received is not None else ""

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
