"""What a request asks of the engine and what the engine hands back, as plain data.

The server turns OpenAI-shaped JSON into a prompt's token ids and ``SamplingParams``; the engine
answers with ``RequestOutput`` events, one per scheduler step that produced tokens for the
request, the last one carrying its ``finish_reason``.
"""

from __future__ import annotations

import dataclasses
import math


class RequestError(ValueError):
    """A request that cannot be served as asked (the server answers 400 with this message)."""


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound (the server answers 429 with Retry-After)."""


#: Bounds on what a request may ask for, refused past them with a clear message.
MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 turn
    those filters off; ``seed`` fixes the draws (the same output alone or in any batch);
    ``stop`` strings end the text before them; ``logprobs`` asks for that many top
    alternatives' log-probabilities per token (None: none); ``ignore_eos`` keeps generating past
    the end-of-sequence token up to ``max_tokens`` (vLLM's extension, for load tests)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False

    def check(self, context_left: int) -> None:
        """Refuse values no sampler can honour, naming the field and its allowed range;
        ``context_left`` is how many tokens fit after the prompt."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > context_left:
            raise RequestError(
                f"max_tokens={self.max_tokens} does not fit: the prompt leaves {context_left} tokens of the "
                "model's context. Lower max_tokens or shorten the prompt."
            )
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise RequestError(f"temperature must be between 0 and {MAX_TEMPERATURE}, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be a non-negative integer (0: off), got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop) or len(self.stop) > 4:
            raise RequestError("stop must be up to 4 non-empty strings")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the top alternatives' (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """New output of one request: the text it adds (whole UTF-8 characters only), its token ids,
    their logprobs when asked, and, on the last event, why it ended ("stop", "length" or
    "abort"). Counts are totals so far."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
