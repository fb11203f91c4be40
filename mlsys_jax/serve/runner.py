"""The engine on a thread of its own, behind an asyncio interface the server awaits.

The engine is not thread-safe and its ``step`` blocks for a whole scheduler iteration (a prefill
chunk or a decode step on the accelerator), so one background thread owns it. The event loop
never calls the engine: it puts add and abort commands in an inbox under a condition variable;
the thread hands them to the engine between steps, steps while there is work, sleeps on the
condition when there is none, and sends each ``RequestOutput`` to its request's asyncio queue with
``loop.call_soon_threadsafe``. A stats snapshot taken by the thread after every change answers
the queue bound and ``/metrics`` without touching the engine.

A request is admitted when the engine's ``add_request`` accepted it; ``submit`` awaits that, so a
bad request, a full queue or a draining runner fail before the server starts a response. A
stream its reader closes early (the client went away) aborts its request, which frees the
engine's slot and KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from mlsys_jax.serve.requests import QueueFull, RequestError, RequestOutput, SamplingParams
from mlsys_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

#: How long the thread waits before stepping again when a step produced nothing though the engine
#: has work (a dynamic batch still filling up): long enough not to spin, short next to a step.
IDLE_POLL_S = 0.002

#: How long ``drain`` and ``stop`` wait for the thread to act on the aborts they queue.
ABORT_WAIT_S = 5.0


class Engine(Protocol):
    """What the runner needs of the serving engine; only one thread may call it."""

    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def context_limit(self) -> int: ...
    @property
    def model_name(self) -> str: ...
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_work(self) -> bool: ...
    def stats(self) -> dict[str, float]: ...


class Draining(RuntimeError):
    """The runner is shutting down and takes no new requests (the server answers 503)."""


class EngineFailed(RuntimeError):
    """The engine raised inside a step; the runner stopped and fails every request (500)."""


class RunnerObserver(Protocol):
    """Where the runner reports per-request timings and token counts (the metrics)."""

    def first_token(self, seconds: float) -> None: ...
    def tokens(self, count: int) -> None: ...
    def request_done(self, outcome: str, *, time_per_output_token: float | None, latency: float) -> None: ...


class _NoObserver:
    def first_token(self, seconds: float) -> None:
        pass

    def tokens(self, count: int) -> None:
        pass

    def request_done(self, outcome: str, *, time_per_output_token: float | None, latency: float) -> None:
        pass


#: ``request_done`` outcomes the runner reports.
FINISHED, ABORTED, FAILED = "finished", "aborted", "error"


class RequestStream:
    """One request's outputs in order, read on the event loop that submitted it. Iteration ends
    after the output with a ``finish_reason``; ``close`` before that aborts the request."""

    def __init__(self, runner: EngineRunner, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._runner = runner
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.admitted: asyncio.Future[None] = loop.create_future()
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    def close(self) -> None:
        """Stop reading; a request still going is aborted (its slot and KV blocks freed)."""
        if not self.done:
            self.done = True
            self._runner.abort(self.request_id)


@dataclasses.dataclass
class _Live:
    """The runner's record of a request from ``submit`` until its last output or abort."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    arrival: float
    prompt_tokens: int
    handed: bool = False
    first_token_at: float | None = None
    tokens: int = 0


@dataclasses.dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str
    notify: bool
    """Send the reader a last output with finish_reason "abort" (the reader is still there)."""


def _send(live: _Live, item: RequestOutput | BaseException) -> None:
    try:
        live.loop.call_soon_threadsafe(live.stream.queue.put_nowait, item)
    except RuntimeError:  # the loop is closed: nobody is reading any more
        pass


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve an admission future on its own loop (unless its waiter was cancelled)."""

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:
        pass


class EngineRunner:
    """Owns ``engine`` on a background thread; ``max_queue`` bounds the requests waiting to be
    admitted (submitted to the runner and not yet in an engine slot), beyond which ``submit``
    raises ``QueueFull``."""

    def __init__(self, engine: Engine, max_queue: int, observer: RunnerObserver | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.observer: RunnerObserver = observer or _NoObserver()
        # Read-only facts of the engine, copied so the event loop never touches the engine.
        self.tokenizer: Tokenizer = engine.tokenizer
        self.context_limit: int = int(engine.context_limit)
        self.model_name: str = engine.model_name
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._live: dict[str, _Live] = {}
        self._pending_adds = 0
        self._busy = False
        self._snapshot: dict[str, float] = dict(engine.stats())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._failed: BaseException | None = None

    # Lifecycle.
    def start(self) -> None:
        """Start the engine thread (again: no-op)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="engine-runner", daemon=True)
            self._thread.start()

    def drain(self, deadline_s: float) -> int:
        """Take no new requests (``submit`` raises ``Draining``), let those in flight finish for up
        to ``deadline_s`` seconds, then abort the rest; returns how many were cut off. Blocks:
        call it off the event loop."""
        end = time.monotonic() + max(0.0, deadline_s)
        with self._cond:
            self._draining = True
            while self._live and self._working() and (left := end - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
            return self._abort_all_locked()

    def stop(self) -> None:
        """Abort what is in flight, stop the thread and wait for it (bounded)."""
        with self._cond:
            self._draining = True
            self._abort_all_locked()
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=ABORT_WAIT_S)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def failed(self) -> BaseException | None:
        """The engine's exception if a step raised (the runner then serves nothing more)."""
        return self._failed

    def stats(self) -> dict[str, float]:
        """The engine's stats as of its last step, plus ``queued`` (waiting to be admitted, the
        bound's count) and ``in_flight`` (submitted and not yet finished)."""
        with self._cond:
            return {**self._snapshot, "queued": self._queued(), "in_flight": len(self._live)}

    # The event loop's side.
    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Refuse, without the engine, a prompt that leaves no room or parameters no sampler takes."""
        n, limit = len(prompt_ids), self.context_limit
        if n == 0:
            raise RequestError("the prompt is empty: give at least one token")
        if n >= limit:
            raise RequestError(
                f"the prompt has {n} tokens and the model's context limit is {limit} tokens (prompt plus "
                "max_tokens must fit). Shorten the prompt."
            )
        params.check(limit - n)

    async def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> RequestStream:
        """Queue a request and wait until the engine admitted it; its outputs follow on the
        returned stream. Raises ``RequestError`` (bad request), ``QueueFull``, ``Draining`` or
        ``EngineFailed`` before anything is streamed."""
        self.validate(prompt_ids, params)
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        with self._cond:
            self._check_open()
            if request_id in self._live:
                raise RequestError(f"request id {request_id!r} is already in use")
            queued = self._queued()
            if queued >= self.max_queue:
                raise QueueFull(f"{queued} requests are waiting to be admitted (the bound is {self.max_queue})")
            self._live[request_id] = _Live(stream, loop, time.monotonic(), len(prompt_ids))
            self._pending_adds += 1
            self._inbox.append(_Add(request_id, [int(i) for i in prompt_ids], params))
            self._cond.notify_all()
        try:
            await stream.admitted
        except BaseException:
            stream.close()  # cancelled while waiting, or refused: either way, forget the request
            raise
        return stream

    async def generate(
        self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; the last has a ``finish_reason``. Leaving the loop
        early (or being cancelled) aborts the request."""
        stream = await self.submit(request_id, prompt_ids, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request that has not finished (no-op otherwise); no more outputs come for it."""
        with self._cond:
            if request_id in self._live:
                self._inbox.append(_Abort(request_id, notify=False))
                self._cond.notify_all()

    # Helpers that hold the lock.
    def _queued(self) -> int:
        return self._pending_adds + int(self._snapshot.get("waiting", 0))

    def _working(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_open(self) -> None:
        if self._failed is not None:
            raise EngineFailed(f"the engine failed and serves no more requests: {self._failed!r}")
        if self._draining or self._stopping:
            raise Draining("the server is shutting down and takes no new requests")
        if not self._working():
            raise Draining("the engine runner is not running")

    def _abort_all_locked(self) -> int:
        """Queue an abort for every request in flight and wait (bounded) until the thread did
        them; returns how many there were."""
        cut = list(self._live)
        if not cut:
            return 0
        if not self._working():  # nothing will process the inbox: end the readers here
            for request_id in cut:
                self._end(request_id, notify=True)
            return len(cut)
        self._inbox.extend(_Abort(request_id, notify=True) for request_id in cut)
        self._cond.notify_all()
        end = time.monotonic() + ABORT_WAIT_S
        while any(r in self._live for r in cut) and self._working() and (left := end - time.monotonic()) > 0:
            self._cond.wait(timeout=left)
        return len(cut)

    def _end(self, request_id: str, *, notify: bool) -> None:
        """Forget an aborted request, count it, and (``notify``) tell its reader."""
        live = self._live.pop(request_id, None)
        if live is None:
            return
        now = time.monotonic()
        self.observer.request_done(ABORTED, time_per_output_token=None, latency=now - live.arrival)
        if notify:
            last = RequestOutput(request_id, "", (), (), "abort", live.prompt_tokens, live.tokens)
            _send(live, last)
        self._cond.notify_all()

    # The engine thread.
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._busy and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._apply_inbox()
                    self._refresh()
                if not self._busy:
                    continue
                outputs = self.engine.step()
                with self._cond:
                    self._deliver(outputs)
                    self._refresh()
                    if not outputs and self._busy and not self._inbox:
                        self._cond.wait(timeout=IDLE_POLL_S)
        except Exception as err:  # the engine is in an unknown state: fail every reader, serve no more
            log.exception("the engine failed; failing every request in flight")
            self._fail(err)
            return
        with self._cond:  # stopping: whatever is left (stop() aborted it already, normally)
            try:
                self._apply_inbox()
            except Exception:
                log.exception("aborting requests while stopping failed")
            for request_id in list(self._live):
                self._end(request_id, notify=True)

    def _apply_inbox(self) -> None:
        commands, self._inbox = self._inbox, []
        for command in commands:
            if isinstance(command, _Add):
                self._pending_adds -= 1
                live = self._live.get(command.request_id)
                if live is None:
                    continue
                try:
                    self.engine.add_request(command.request_id, command.prompt_ids, command.params)
                except RequestError as err:  # refused as asked: the submitter answers 400
                    self._refuse(command.request_id, err)
                    continue
                except Exception as err:  # the engine could not take it: the submitter answers 500
                    log.exception("add_request failed for %s", command.request_id)
                    self._refuse(command.request_id, EngineFailed(f"the engine could not take the request: {err!r}"))
                    continue
                live.handed = True
                _settle(live.stream.admitted, None)
            else:
                live = self._live.get(command.request_id)
                if live is not None and live.handed:
                    self.engine.abort(command.request_id)
                self._end(command.request_id, notify=command.notify)

    def _refuse(self, request_id: str, error: BaseException) -> None:
        live = self._live.pop(request_id)
        live.stream.done = True
        _settle(live.stream.admitted, error)
        self._cond.notify_all()

    def _refresh(self) -> None:
        self._busy = self.engine.has_work()
        self._snapshot = dict(self.engine.stats())

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        tokens = 0
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is None:  # aborted since it was stepped
                continue
            if output.token_ids:
                tokens += len(output.token_ids)
                live.tokens += len(output.token_ids)
                if live.first_token_at is None:
                    live.first_token_at = now
                    self.observer.first_token(now - live.arrival)
            if output.finished:
                del self._live[output.request_id]
                generated = max(live.tokens, output.completion_tokens)
                per_token = None
                if live.first_token_at is not None and generated > 1:
                    per_token = (now - live.first_token_at) / (generated - 1)
                outcome = ABORTED if output.finish_reason == "abort" else FINISHED
                self.observer.request_done(outcome, time_per_output_token=per_token, latency=now - live.arrival)
                self._cond.notify_all()
            _send(live, output)
        if tokens:
            self.observer.tokens(tokens)

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            self._failed = err
            for live in self._live.values():
                failure = EngineFailed(f"the engine failed: {err!r}")
                _settle(live.stream.admitted, failure)
                _send(live, failure)
                self.observer.request_done(FAILED, time_per_output_token=None, latency=time.monotonic() - live.arrival)
            self._live.clear()
            self._inbox.clear()
            self._pending_adds = 0
            self._cond.notify_all()
