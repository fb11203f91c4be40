"""Preemption: SIGTERM (what a scheduler sends before it takes the machine) and Ctrl-C ask the
run to finish its current step, save it and exit cleanly; a second Ctrl-C exits at once.

In a job of several processes the save must happen at the same step everywhere, so there the
notice goes through JAX's preemption sync (the coordination service picks the step every process
stops at); one process alone just stops after the step it is on.

Python runs signal handlers only between bytecodes of the main thread, which may be waiting on
the devices for seconds, and two signals that arrive meanwhile reach the handler as one. So the
signals are also written, one byte each, to a wake-up socket that a small thread reads: it says
so at once, and exits at the second Ctrl-C however busy the main thread is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
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
        self._lock = threading.Lock()
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1

    def install(self) -> Self:
        """Catch the signals; outside the main thread (where Python allows no handlers) nothing is
        caught and the run stops only by its own end."""
        if threading.current_thread() is not threading.main_thread():
            return self
        self._multiprocess = jax.process_count() > 1
        # Several processes: JAX's own SIGTERM handler feeds the preemption sync, so leave it be.
        wanted = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
        for sig in wanted:
            self._previous[sig] = signal.signal(sig, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(reader,), name="stop-requests", daemon=True).start()
        return self

    def _watch(self, reader: socket.socket) -> None:
        """Each signal as it arrives, even while the main thread waits on the devices."""
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self._previous:
                    self._note(signum)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del signum, frame  # the watching thread has seen it (Python's handler must still be ours)

    def _note(self, signum: int) -> None:
        with self._lock:
            if self.received is not None:
                if signum == signal.SIGINT:
                    print("\ninterrupted twice: exiting now, without saving", file=sys.stderr, flush=True)
                    os._exit(130)
                return
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
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for sock in self._wakeup:
                with contextlib.suppress(OSError):
                    sock.close()
            self._wakeup = None

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
