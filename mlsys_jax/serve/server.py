"""The OpenAI-compatible HTTP server in front of an ``EngineRunner``, and ``mlsys-jax serve``.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent
events the way the ``openai`` client reads them, or whole with ``usage``), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus). Every refusal is OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not UTF-8 JSON, an
unknown field, a wrong type or a value out of range (naming the field), 404 for another model's
name, 429 with ``Retry-After`` when the queue is full, 503 while draining. Bodies are parsed here
rather than by FastAPI, so a refusal is a 400 with our message, never FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from mlsys_jax.serve.config import ServeConfig
from mlsys_jax.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from mlsys_jax.serve.requests import QueueFull, RequestError, RequestOutput, SamplingParams, TokenLogprob
from mlsys_jax.serve.runner import Draining, EngineFailed, EngineRunner, RequestStream
from mlsys_jax.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, encode_prompt, render_chat

log = logging.getLogger(__name__)

#: The largest request body read (a prompt past the context limit is refused anyway).
MAX_BODY_BYTES = 16 << 20

#: Seconds a client told 429 is asked to wait before retrying.
RETRY_AFTER_S = 1

#: Completions' max_tokens when the request does not say (OpenAI's default).
DEFAULT_MAX_TOKENS = 16

Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]


# Request bodies: strict types, no unknown fields.
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields both endpoints take. ``top_k`` and ``ignore_eos`` are vLLM's extensions; ``user``, ``stream_options``
    and the neutral values of ``n``, the penalties and ``logit_bias`` are accepted as OpenAI's
    clients send them."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    ignore_eos: bool | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


#: How a union-typed field is described when a value fits none of its types.
UNION_TYPES = {
    "prompt": "a string, a list of one string, or a list of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}

#: Field names of the bodies (what a validation error's location is made of, besides indices).
FIELD_NAMES = {
    name
    for body in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
    for name in body.model_fields
}


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One message for pydantic's errors, naming each field (unknown ones as such), and the
    first field's path as OpenAI's ``param``."""
    by_path: dict[str, list[Any]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        named = [p for p in loc if isinstance(p, int) or p in FIELD_NAMES]  # no union members' type tags
        if error["type"] == "extra_forbidden":  # the unknown name itself is no field of ours
            named = [p for p in loc[:-1] if isinstance(p, int) or p in FIELD_NAMES] + list(loc[-1:])
        path = ".".join(str(p) for p in named)
        by_path.setdefault(path or "body", []).append(error)
    unknown = [p for p, errs in by_path.items() if errs[0]["type"] == "extra_forbidden"]
    parts = []
    if unknown:
        names = ", ".join(repr(p) for p in unknown)
        parts.append(f"unknown field{'s' if len(unknown) > 1 else ''} {names}")
    for path, errs in by_path.items():
        if path in unknown:
            continue
        if errs[0]["type"] == "missing":
            parts.append(f"missing field {path!r}")
        elif len(errs) > 1:
            parts.append(f"{path!r} must be {UNION_TYPES.get(path.split('.')[-1], 'of another type')}")
        else:
            parts.append(f"{path!r}: {errs[0]['msg']}")
    return "; ".join(parts[:6]), next(iter(by_path), None)


T = TypeVar("T", bound=BaseModel)


async def read_body(request: Request, model: type[T]) -> T:
    """The request's JSON body as ``model``; 400 (413 if too large) with a clear message otherwise."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not valid UTF-8 (at byte {err.start}: {err.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(
            400, f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise APIError(400, message, param=param) from None


def _only_default(value: object, default: object, name: str, why: str) -> None:
    if value is not None and value != default:
        raise APIError(400, f"{name}={value!r} is not supported: {why}", param=name)


def _check_common(body: _SamplingFields) -> None:
    """Refuse OpenAI fields that would change the computation in ways this server does not."""
    _only_default(body.n, 1, "n", "this server returns one choice per request (n must be 1)")
    _only_default(body.presence_penalty, 0, "presence_penalty", "penalties are not implemented (use 0)")
    _only_default(body.frequency_penalty, 0, "frequency_penalty", "penalties are not implemented (use 0)")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _sampling(body: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=_stops(body.stop),
        logprobs=logprobs,
        ignore_eos=bool(body.ignore_eos),
    )


def _utf8(text: str, param: str) -> str:
    """``text`` if it encodes as UTF-8 (JSON can carry lone surrogates that do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} holds an unpaired UTF-16 surrogate, which is not text", param=param) from None
    return text


#: SamplingParams fields whose RequestError messages start with their name.
_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "logprobs", "stop")


def _param_of(message: str, default: str) -> str:
    return next((f for f in _PARAM_FIELDS if message.startswith(f)), default)


def token_piece(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as logprobs show it: its text and its UTF-8 bytes (a byte token that is part of a
    character shows as ``\\xNN``)."""
    if isinstance(tokenizer, ByteTokenizer):
        data = bytes([token_id]) if 0 <= token_id < 256 else b""
        return data.decode("utf-8", errors="backslashreplace"), list(data)
    text = tokenizer.decode([token_id])
    return text, list(text.encode("utf-8"))


@dataclasses.dataclass
class _Job:
    """One request's answer under construction: its ids, shape (chat or completion) and options."""

    request_id: str
    created: int
    model: str
    chat: bool
    prompt_tokens: int
    logprobs: bool
    include_usage: bool
    tokenizer: Tokenizer
    text_offset: int = 0

    def chunk(self, choice: dict[str, Any]) -> bytes:
        payload: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice}],
        }
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def logprobs_of(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """OpenAI's logprobs object for some tokens (None when not asked)."""
        if not self.logprobs:
            return None
        if self.chat:
            content = []
            for entry in entries:
                text, data = token_piece(self.tokenizer, entry.token_id)
                top = [
                    dict(zip(("token", "bytes"), token_piece(self.tokenizer, t), strict=True), logprob=lp)
                    for t, lp in entry.top.items()
                ]
                content.append({"token": text, "logprob": entry.logprob, "bytes": data, "top_logprobs": top})
            return {"content": content}
        pieces = [token_piece(self.tokenizer, e.token_id)[0] for e in entries]
        offsets = []
        for piece in pieces:
            offsets.append(self.text_offset)
            self.text_offset += len(piece)
        return {
            "tokens": pieces,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_piece(self.tokenizer, t)[0]: lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets,
        }


def sse(payload: object) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _aborted_message(output: RequestOutput) -> str:
    return (
        f"the server is shutting down and stopped this request after {output.completion_tokens} tokens; "
        "retry it on another replica or later"
    )


def _completion_tokens(outputs: Sequence[RequestOutput]) -> int:
    counted = sum(len(o.token_ids) for o in outputs)
    return max(counted, outputs[-1].completion_tokens if outputs else 0)


class EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` runs however the response ends, so a client that
    disconnects mid-stream always aborts its request."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _events(job: _Job, stream: RequestStream) -> AsyncIterator[bytes]:
    """The SSE body of a streamed answer: a role chunk (chat), text chunks, a finish chunk, the
    usage chunk when asked, ``[DONE]``; an error event if the request is cut off."""
    try:
        if job.chat:
            yield job.chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        tokens = 0
        async for output in stream:
            tokens = max(tokens + len(output.token_ids), output.completion_tokens)
            if output.finish_reason == "abort":
                error = {
                    "message": _aborted_message(output),
                    "type": "server_error",
                    "param": None,
                    "code": "server_draining",
                }
                yield sse({"error": error})
                return
            if output.text or (job.logprobs and output.logprobs):
                text = {"delta": {"content": output.text}} if job.chat else {"text": output.text}
                yield job.chunk({**text, "logprobs": job.logprobs_of(output.logprobs), "finish_reason": None})
            if output.finished:
                empty = {"delta": {}} if job.chat else {"text": ""}
                yield job.chunk({**empty, "logprobs": None, "finish_reason": output.finish_reason})
        if job.include_usage:
            object_name = "chat.completion.chunk" if job.chat else "text_completion"
            yield sse(
                {
                    "id": job.request_id,
                    "object": object_name,
                    "created": job.created,
                    "model": job.model,
                    "choices": [],
                    "usage": job.usage(tokens),
                }
            )
        yield b"data: [DONE]\n\n"
    except EngineFailed as err:
        yield sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": "engine_failed"}})
    finally:
        stream.close()


async def _until_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is read, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, stream: RequestStream) -> list[RequestOutput] | None:
    """All of a request's outputs, or None if the client left first (the request is aborted)."""
    outputs: list[RequestOutput] = []

    async def read() -> None:
        async for output in stream:
            outputs.append(output)

    reader, watcher = asyncio.ensure_future(read()), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not reader.done():
            reader.cancel()
        stream.close()
    if not reader.done() or reader.cancelled():
        return None
    reader.result()  # the engine's failure, if any
    return outputs


class OpenAIServer:
    """The endpoints' logic over one runner; ``create_app`` routes to it."""

    def __init__(self, runner: EngineRunner, model_id: str, metrics: ServeMetrics) -> None:
        self.runner = runner
        self.model_id = model_id
        self.metrics = metrics
        self.tokenizer = runner.tokenizer
        self.created = int(time.time())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist: this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mlsys-jax",
            "max_model_len": self.runner.context_limit,
        }

    def completion_prompt(self, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return [int(i) for i in encode_prompt(self.tokenizer, _utf8(prompt, "prompt"))]
        if not prompt:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request: got a list of {len(prompt)} prompts", param="prompt")
            return self.completion_prompt(prompt[0])
        ids = [int(i) for i in prompt]
        vocab = self.tokenizer.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        return ids

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        conversation = []
        for i, message in enumerate(messages):
            content = message.content
            text = content if isinstance(content, str) else "".join(part.text for part in content)
            conversation.append({"role": message.role, "content": _utf8(text, f"messages.{i}.content")})
        try:
            rendered = render_chat(self.tokenizer, conversation)
        except TokenizerError as err:
            raise APIError(400, str(err), param="messages") from None
        return [int(i) for i in self.tokenizer.encode(rendered)]

    async def submit(self, prompt_ids: list[int], params: SamplingParams, prefix: str, param: str) -> RequestStream:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            return await self.runner.submit(request_id, prompt_ids, params)
        except RequestError as err:
            raise APIError(400, str(err), param=_param_of(str(err), param)) from None
        except QueueFull as err:
            raise APIError(
                429,
                f"the server is at capacity: {err}. Retry after {RETRY_AFTER_S} s.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except Draining as err:
            raise APIError(503, str(err), type="service_unavailable", code="server_draining") from None
        except EngineFailed as err:
            raise APIError(500, str(err), type="server_error", code="engine_failed") from None

    async def completions(self, request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        self.check_model(body.model)
        _check_common(body)
        _only_default(body.echo, False, "echo", "the prompt is not echoed back")
        _only_default(body.best_of, 1, "best_of", "this server returns one choice per request")
        _only_default(body.suffix, "", "suffix", "insertion is not supported")
        prompt_ids = self.completion_prompt(body.prompt)
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = _sampling(body, max_tokens, body.logprobs)
        return await self.answer(request, body, prompt_ids, params, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        self.check_model(body.model)
        _check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise APIError(
                400, "max_tokens and max_completion_tokens disagree: give one of them", param="max_completion_tokens"
            )
        prompt_ids = self.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # OpenAI's chat default: as long as the context allows
            max_tokens = max(1, self.runner.context_limit - len(prompt_ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling(body, max_tokens, logprobs)
        return await self.answer(request, body, prompt_ids, params, chat=True)

    async def answer(
        self, request: Request, body: _SamplingFields, prompt_ids: list[int], params: SamplingParams, *, chat: bool
    ) -> Response:
        """Submit the request, then stream its events or collect them into one JSON answer."""
        stream = await self.submit(prompt_ids, params, "chatcmpl" if chat else "cmpl", "messages" if chat else "prompt")
        job = _Job(
            request_id=stream.request_id,
            created=int(time.time()),
            model=self.model_id,
            chat=chat,
            prompt_tokens=len(prompt_ids),
            logprobs=params.logprobs is not None,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            tokenizer=self.tokenizer,
        )
        if body.stream:
            return EventStream(_events(job, stream), on_close=stream.close)
        try:
            outputs = await _collect(request, stream)
        except EngineFailed as err:
            raise APIError(500, str(err), type="server_error", code="engine_failed") from None
        if outputs is None:  # the client left; nobody reads this
            return Response(status_code=499)
        last = outputs[-1]
        if last.finish_reason == "abort":
            raise APIError(503, _aborted_message(last), type="service_unavailable", code="server_draining")
        text = "".join(o.text for o in outputs)
        logprobs = job.logprobs_of([lp for o in outputs for lp in o.logprobs])
        if chat:
            choice = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        return JSONResponse(
            {
                "id": job.request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": job.created,
                "model": self.model_id,
                "choices": [{"index": 0, **choice, "logprobs": logprobs, "finish_reason": last.finish_reason}],
                "usage": job.usage(_completion_tokens(outputs)),
            }
        )

    def health(self) -> JSONResponse:
        if self.runner.failed is not None:
            return JSONResponse({"status": "failed", "error": repr(self.runner.failed)}, status_code=503)
        if self.runner.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_id})

    def render_metrics(self) -> Response:
        return Response(self.metrics.render(self.runner.stats()), media_type=CONTENT_TYPE_LATEST)


#: Outcomes counted for refusals, by status.
_REFUSALS = {400: "bad_request_400", 404: "not_found_404", 413: "bad_request_400", 429: "rejected_429"}


def create_app(runner: EngineRunner, *, model_id: str, metrics: ServeMetrics | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``runner`` (started with the app; the caller stops it),
    serving ``model_id``; its metrics are in a registry of its own."""
    metrics = metrics or ServeMetrics()
    runner.observer = metrics
    server = OpenAIServer(runner, model_id, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        yield

    app = FastAPI(title="mlsys-jax", lifespan=lifespan)
    app.state.server = server

    def refused(error: APIError) -> JSONResponse:
        outcome = _REFUSALS.get(error.status, "unavailable_503" if error.status == 503 else None)
        if outcome is not None:
            metrics.count(outcome)
        return error.response()

    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return refused(exc)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(list(exc.errors()))
        return refused(APIError(400, message, param=param))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=str(exc.status_code)).response()

    async def on_crash(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        metrics.count("error")
        return APIError(500, f"internal error: {exc!r}", type="server_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)

    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return server.model_card()

    @app.get("/health")
    async def health() -> Response:
        return server.health()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return server.render_metrics()

    return app


# ``mlsys-jax serve``.
def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, so a taken port fails before the model loads; it listens
    only once the model is loaded (until then connections are refused, not left hanging)."""
    from mlsys_jax.models.base import ConfigError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {err.strerror or err}. Fix: pick another --port or --host, or stop "
            "what is using it."
        ) from None
    return sock


def _uvicorn_server(app: FastAPI, runner: EngineRunner, drain_seconds: float, debug: bool) -> Any:
    """A uvicorn server whose first SIGTERM/SIGINT drains the runner before shutting down (new
    requests get 503 meanwhile), a second aborts the running requests at once, a third stops
    without cleaning up. It returns normally (exit status 0), never re-raising the signal."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.signals += 1
            name = signal.Signals(sig).name
            if self.signals == 1:
                print(f"{name}: draining (up to {drain_seconds:g} s for running requests)", flush=True)
                threading.Thread(target=self.drain_then_exit, args=(drain_seconds,), name="drain", daemon=True).start()
            elif self.signals == 2:  # stop waiting: abort what runs, then shut down as usual
                print(f"{name} again: aborting running requests", flush=True)
                threading.Thread(target=runner.drain, args=(0.0,), name="abort", daemon=True).start()
            else:
                self.should_exit = self.force_exit = True

        def drain_then_exit(self, seconds: float) -> None:
            cut = runner.drain(seconds)
            if cut:
                print(f"aborted {cut} requests still running", flush=True)
            self.should_exit = True

    config = uvicorn.Config(
        app,
        log_level="info" if debug else "warning",
        access_log=debug,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    return DrainingServer(config)


def serve(cfg: ServeConfig) -> None:
    """Load the model named by ``cfg``, serve it until SIGTERM/SIGINT, drain, return."""
    from mlsys_jax.serve.loading import engine_for

    sock = bind(cfg.host, cfg.port)
    try:
        engine = engine_for(cfg)
        stats = engine.stats()
        model_id = cfg.model_name or engine.model_name
        runner = EngineRunner(engine, cfg.max_queue)
        app = create_app(runner, model_id=model_id)
        server = _uvicorn_server(app, runner, cfg.drain_seconds, cfg.debug)
        runner.start()
        sock.listen(2048)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        blocks = int(stats.get("kv_blocks_total", cfg.num_blocks))
        weights = "int8 weights" if cfg.weights == "int8" else "weights as trained"
        cache = "int8" if cfg.kv_cache == "int8" else cfg.dtype
        size = f", {stats['kv_cache_bytes'] / 2**20:.1f} MiB" if "kv_cache_bytes" in stats else ""
        print(
            f"serving {model_id} on http://{shown}:{port} (scheduler {cfg.scheduler}, {cfg.dtype} compute, "
            f"{weights}, {blocks} {cache} KV blocks of {cfg.block_size} tokens{size})",
            flush=True,
        )
        try:
            server.run(sockets=[sock])
        finally:
            runner.stop()
    finally:
        sock.close()
