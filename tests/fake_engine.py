"""A deterministic stand-in for the serving engine, for protocol tests of the runner and server.

It answers the engine's calls (``add_request``, ``abort``, ``step``, ``has_work``, ``stats``)
with the byte tokenizer: a request's continuation is its prompt's characters reversed (shuffled
by ``seed`` when ``temperature`` > 0), one byte per step, then EOS. Multi-byte characters thus
arrive over several steps, and like the real engine the fake emits whole characters only,
holding back an incomplete one and any text that may still become a stop string. Tests can pause
``step`` (to fill the queue or hold a request in flight) and read what was added and aborted.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import random
import threading
import time

from mlsys_jax.serve.requests import RequestError, RequestOutput, SamplingParams, TokenLogprob
from mlsys_jax.tokenizer import ByteTokenizer


@dataclasses.dataclass
class _Seq:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    continuation: bytes
    generated: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0
    decoder: codecs.IncrementalDecoder = dataclasses.field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )


def continuation_of(prompt_ids: list[int], params: SamplingParams) -> bytes:
    """What the fake generates for a prompt: its characters reversed (greedy), or reversed and
    shuffled by the seed (sampled)."""
    chars = list(bytes(i for i in prompt_ids if i < 256).decode("utf-8", errors="replace"))[::-1]
    if params.temperature > 0:
        random.Random(params.seed).shuffle(chars)
    return "".join(chars).encode("utf-8")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still begin a stop string."""
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


class FakeEngine:
    """The engine's interface over a reversed-prompt "model": ``max_seqs`` slots, one token per
    running sequence per step. Not thread-safe, like the real one."""

    def __init__(self, *, context_limit: int = 512, max_seqs: int = 8, block_size: int = 16, num_blocks: int = 256):
        self.tokenizer = ByteTokenizer()
        self.context_limit = context_limit
        self.model_name = "fake-reverser"
        self.max_seqs = max_seqs
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.steps = 0
        self.step_delay = 0.0
        self._gate = threading.Event()
        self._gate.set()
        self.in_step = threading.Event()

    # Test controls.
    def pause(self) -> None:
        """Make the next ``step`` wait (at most 20 s) until ``resume``."""
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    # The engine's interface.
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if any(s.request_id == request_id for s in self.waiting + self.running):
            raise RequestError(f"request id {request_id!r} is already in use")
        if len(prompt_ids) >= self.context_limit:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the limit is {self.context_limit}")
        params.check(self.context_limit - len(prompt_ids))
        self.added.append(request_id)
        self.waiting.append(_Seq(request_id, list(prompt_ids), params, continuation_of(list(prompt_ids), params)))

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.waiting = [s for s in self.waiting if s.request_id != request_id]
        self.running = [s for s in self.running if s.request_id != request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, float]:
        used = sum(math.ceil((len(s.prompt_ids) + len(s.generated)) / self.block_size) for s in self.running)
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "kv_blocks_used": used,
            "kv_blocks_total": self.num_blocks,
            "programs_compiled": 2,
        }

    def step(self) -> list[RequestOutput]:
        self.in_step.set()
        self._gate.wait(timeout=20)
        if self.step_delay:
            time.sleep(self.step_delay)
        self.steps += 1
        while self.waiting and len(self.running) < self.max_seqs:
            self.running.append(self.waiting.pop(0))
        outputs = [self._advance(seq) for seq in self.running]
        self.running = [s for s, out in zip(self.running, outputs, strict=True) if not out.finished]
        return outputs

    def _advance(self, seq: _Seq) -> RequestOutput:
        """One token for ``seq``, and the whole characters it completes (minus stop strings)."""
        i = len(seq.generated)
        token = seq.continuation[i] if i < len(seq.continuation) else self.tokenizer.EOS
        seq.generated.append(token)
        finish = None
        if token == self.tokenizer.EOS:
            finish = "stop"
        else:
            seq.text += seq.decoder.decode(bytes([token]))
        visible = seq.text
        hits = [seq.text.find(s) for s in seq.params.stop if s in seq.text]
        if hits:
            visible, finish = seq.text[: min(hits)], "stop"
        elif finish is None and len(seq.generated) >= seq.params.max_tokens:
            finish = "length"
        elif finish is None:
            visible = seq.text[: len(seq.text) - _held_back(seq.text, seq.params.stop)]
        new_text, seq.sent = visible[seq.sent :], max(seq.sent, len(visible))
        logprobs = ()
        if seq.params.logprobs is not None:
            top = {token: -0.5, **{t: -1.5 - k for k, t in enumerate((65, 66, 67, 68)) if t != token}}
            logprobs = (TokenLogprob(token, -0.5, dict(list(top.items())[: seq.params.logprobs])),)
        return RequestOutput(
            request_id=seq.request_id,
            text=new_text,
            token_ids=(token,),
            logprobs=logprobs,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.generated),
        )
