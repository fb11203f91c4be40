"""The serving engine: requests in, tokens out, over a paged KV cache under a plan.

Every step the scheduler admits waiting requests into free decode slots (continuously, or in
whole batches for static and dynamic batching), feeds one chunk of one prompt (so a long prompt
never stalls decoding), decodes one token for every sequence that has its prompt in the cache,
samples on the device, and retires finished sequences at once. A sequence's keys and values
live in fixed-size blocks found through its block table; blocks are taken as it grows and given
back when it ends. When none is free, the youngest running sequence is preempted: its blocks go
back and it is recomputed from its tokens later. Programs are jitted once per shape: one decode
step (``max_seqs`` rows of one token), one prefill per chunk bucket (powers of two from 16 up to
``prefill_chunk``), and one sampler per row count.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import zlib
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax.models import base
from mlsys_jax.models.base import ConfigError, LanguageModel, PagedKV
from mlsys_jax.models.quantized import int8_page_spec
from mlsys_jax.parallel.plan import Plan
from mlsys_jax.params import init_params, is_spec
from mlsys_jax.serve.kv_blocks import TRASH, BlockAllocator
from mlsys_jax.serve.requests import RequestError, RequestOutput, SamplingParams, TokenLogprob
from mlsys_jax.serve.sampling import sample
from mlsys_jax.serve.text import TextStream
from mlsys_jax.tokenizer import Tokenizer

Scheduler = Literal["continuous", "dynamic", "static"]
KVCache = Literal["auto", "int8"]
MIN_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and how big its cache is."""

    max_seqs: int = 16
    block_size: int = 16
    num_blocks: int = 512
    prefill_chunk: int = 64
    scheduler: Scheduler = "continuous"
    batch_timeout_s: float = 0.05
    kv_cache: KVCache = "auto"
    """auto: pools in the compute dtype; int8: int8 pools with one scale per block and K/V head."""

    def __post_init__(self) -> None:
        if self.prefill_chunk < 1 or self.max_seqs < 1 or self.block_size < 1:
            raise ConfigError("max_seqs, block_size and prefill_chunk must be at least 1")
        if self.scheduler not in ("continuous", "dynamic", "static"):
            raise ConfigError(f"scheduler {self.scheduler!r} is not continuous, dynamic or static")
        if self.kv_cache not in ("auto", "int8"):
            raise ConfigError(f"kv_cache {self.kv_cache!r} is not auto or int8")

    @property
    def chunk_buckets(self) -> list[int]:
        """The prefill lengths a program is compiled for."""
        out, n = [], MIN_CHUNK
        while n < self.prefill_chunk:
            out.append(n)
            n *= 2
        return [*out, self.prefill_chunk] if self.prefill_chunk > MIN_CHUNK else [self.prefill_chunk]


def make_pools(
    model: LanguageModel, plan: Plan, num_blocks: int, block_size: int, kv_cache: KVCache = "auto"
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Empty K and V pools of a paged cache placed by ``plan`` (the heads split like the
    attention's), and their shardings; int8 pools carry one scale per block and K/V head."""
    if model.page_specs is None:
        raise ConfigError(f"model {model.name!r} cannot serve from a paged KV cache (its family gives no page_specs)")
    specs = model.page_specs(num_blocks, block_size)
    if kv_cache == "int8":
        specs = {name: int8_page_spec(spec) for name, spec in specs.items()}
    shardings = jax.tree_util.tree_map(
        lambda s: plan.activation_sharding(s.logical_axes, s.shape, "kv cache pages"), specs, is_leaf=is_spec
    )
    pools = jax.jit(lambda: init_params(specs, jax.random.key(0)), out_shardings=shardings)()
    return (pools["k"], pools["v"]), (shardings["k"], shardings["v"])


@dataclasses.dataclass
class Sequence:
    """One request in the engine: its tokens, how many of them are in the cache, its blocks."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    arrived: float
    generated: list[int] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    slot: int | None = None
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def pending(self) -> int:
        return len(self.prompt) + len(self.generated) - self.cached


class Engine:
    """Serves a ``LanguageModel`` with a paged cache; not thread-safe (one caller at a time)."""

    def __init__(
        self,
        model: LanguageModel,
        plan: Plan,
        params: Any,
        tokenizer: Tokenizer,
        *,
        context_limit: int,
        config: EngineConfig = EngineConfig(),
        model_name: str = "model",
        record_logits: bool = False,
    ) -> None:
        self.model, self.plan, self.params, self.tokenizer = model, plan, params, tokenizer
        self.config, self.model_name, self.record_logits = config, model_name, record_logits
        self.context_limit = int(context_limit)
        self.max_blocks = math.ceil(self.context_limit / config.block_size)
        self.allocator = BlockAllocator(config.num_blocks)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.compiled: collections.Counter[str] = collections.Counter()
        self.tokens_generated = 0
        self.preemptions = 0
        (self.k_pages, self.v_pages), self._page_shardings = make_pools(
            model, plan, config.num_blocks, config.block_size, config.kv_cache
        )
        rep = plan.replicated()
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1, 2), out_shardings=(rep, *self._page_shardings))
        self._sample = jax.jit(self._sample_fn, out_shardings=rep)

    # ---- the programs -----------------------------------------------------------------------------
    def _forward_fn(self, params, k_pages, v_pages, tokens, positions, slots, tables, lengths, last):
        self.compiled[f"forward {tokens.shape[0]}x{tokens.shape[1]}"] += 1
        cache = PagedKV(k_pages, v_pages, tables, slots, lengths)
        x, cache = base.extend(self.model, params, tokens, positions, cache, self.plan.layout)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        return self.model.head(params, x, self.plan.layout)[:, 0], cache.k, cache.v

    def _sample_fn(self, logits, temperature, top_k, top_p, seed, count):
        self.compiled[f"sample {logits.shape[0]}"] += 1
        return sample(logits, temperature, top_k, top_p, seed, count)

    @property
    def programs_compiled(self) -> int:
        return len(self.compiled)

    @property
    def program_bound(self) -> int:
        """The most programs a running engine compiles: one decode step, one prefill per chunk
        bucket, a sampler for each of the two row counts."""
        return 1 + len(self.config.chunk_buckets) + 2

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request, refusing one that cannot be served with a message naming why."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("the prompt is empty; give at least one token")
        if any(not 0 <= t < self.model.vocab_size for t in prompt):
            raise RequestError(f"the prompt holds token ids outside the vocabulary [0, {self.model.vocab_size})")
        if len(prompt) >= self.context_limit:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; the model's context is {self.context_limit} tokens, and at "
                "least one must be left to generate. Shorten the prompt."
            )
        params.check(self.context_limit - len(prompt))
        need = math.ceil((len(prompt) + params.max_tokens) / self.config.block_size)
        if need > self.allocator.capacity:
            raise RequestError(
                f"the prompt and max_tokens need {need} KV-cache blocks; the cache holds {self.allocator.capacity}. "
                "Lower max_tokens or shorten the prompt."
            )
        if any(s.request_id == request_id for s in self._all()):
            raise RequestError(f"request id {request_id!r} is already in use")
        stream = TextStream(self.tokenizer, params.stop)
        self.waiting.append(Sequence(request_id, prompt, params, stream, time.monotonic()))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is, giving back its blocks; no more output for it."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
        for seq in list(self.running.values()):
            if seq.request_id == request_id:
                self._retire(seq)

    def _all(self) -> list[Sequence]:
        return [*self.waiting, *self.running.values()]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, float]:
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "kv_blocks_used": self.allocator.used,
            "kv_blocks_total": self.allocator.capacity,
            "programs_compiled": self.programs_compiled,
            "tokens_generated": self.tokens_generated,
            "preemptions": self.preemptions,
            "kv_cache_bytes": self.kv_cache_bytes,
        }

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV-cache pools take (values and, for int8, scales), over all devices."""
        return sum(int(x.size * x.dtype.itemsize) for x in jax.tree_util.tree_leaves((self.k_pages, self.v_pages)))

    # ---- scheduling ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        cfg = self.config
        if cfg.scheduler != "continuous":
            if self.running or not self.waiting:
                return
            full = len(self.waiting) >= cfg.max_seqs
            waited = time.monotonic() - self.waiting[0].arrived >= cfg.batch_timeout_s
            if not (full or (cfg.scheduler == "dynamic" and waited)):
                return
        free = [s for s in range(cfg.max_seqs) if s not in self.running]
        while free and self.waiting:
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)
            self.running[seq.slot] = seq

    def _retire(self, seq: Sequence) -> None:
        self.allocator.release(seq.blocks)
        seq.blocks, seq.cached = [], 0
        if seq.slot is not None:
            self.running.pop(seq.slot, None)
        seq.slot = None

    def _preempt_for(self, needy: Sequence) -> bool:
        """Free blocks by sending the youngest other running sequence back to the queue (it is
        recomputed from its tokens when readmitted); False when there is none."""
        others = [s for s in self.running.values() if s is not needy]
        if not others:
            return False
        victim = max(others, key=lambda s: s.arrived)
        self._retire(victim)
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return True

    def _reserve(self, seq: Sequence, upto: int) -> bool:
        """Blocks for positions [0, upto); preempts others when the pool is empty. False if
        ``seq`` itself was preempted instead (it cannot grow now)."""
        need = math.ceil(upto / self.config.block_size) - len(seq.blocks)
        while need > 0:
            got = self.allocator.allocate(need)
            if got is not None:
                seq.blocks += got
                return True
            if not self._preempt_for(seq):
                self._retire(seq)
                self.waiting.appendleft(seq)
                self.preemptions += 1
                return False
        return True

    def _table(self, seq: Sequence) -> np.ndarray:
        row = np.full((self.max_blocks,), TRASH, np.int32)
        row[: len(seq.blocks)] = seq.blocks
        return row

    def _slots(self, seq: Sequence, start: int, n: int, width: int) -> np.ndarray:
        out = np.full((width,), TRASH, np.int32)  # padding writes to the reserved block
        pos = np.arange(start, start + n)
        bs = self.config.block_size
        out[:n] = np.asarray(seq.blocks, np.int32)[pos // bs] * bs + pos % bs
        return out

    def _run(self, rows: list[tuple[Sequence, int]], width: int, nrows: int) -> jax.Array:
        """Feed ``n`` pending tokens of each (sequence, n) as one program call of ``nrows`` x
        ``width`` tokens; returns the logits after each row's last token (nrows, vocab)."""
        tokens = np.zeros((nrows, width), np.int32)
        positions = np.zeros((nrows, width), np.int32)
        slots = np.full((nrows, width), TRASH, np.int32)
        tables = np.full((nrows, self.max_blocks), TRASH, np.int32)
        lengths = np.zeros((nrows,), np.int32)
        last = np.zeros((nrows,), np.int32)
        for r, (seq, n) in enumerate(rows):
            start = seq.cached
            tokens[r, :n] = seq.tokens[start : start + n]
            positions[r] = start + np.minimum(np.arange(width), n - 1)
            slots[r] = self._slots(seq, start, n, width)
            tables[r] = self._table(seq)
            lengths[r], last[r] = start + n, n - 1
        logits, self.k_pages, self.v_pages = self._forward(
            self.params, self.k_pages, self.v_pages, tokens, positions, slots, tables, lengths, last
        )
        for seq, n in rows:
            seq.cached += n
        return logits

    def _draw(self, rows: list[Sequence], logits: jax.Array, nrows: int) -> list[RequestOutput]:
        temperature = np.zeros((nrows,), np.float32)
        top_k = np.zeros((nrows,), np.int32)
        top_p = np.ones((nrows,), np.float32)
        seed = np.zeros((nrows,), np.uint32)
        count = np.zeros((nrows,), np.int32)
        for r, seq in enumerate(rows):
            p = seq.params
            temperature[r], top_k[r], top_p[r] = p.temperature, p.top_k, p.top_p
            seed[r] = (p.seed if p.seed is not None else zlib.crc32(seq.request_id.encode())) % 2**32
            count[r] = len(seq.generated)
        tokens, chosen, top_ids, top_lp = jax.device_get(self._sample(logits, temperature, top_k, top_p, seed, count))
        if self.record_logits:
            host = np.asarray(jax.device_get(logits))
            for r, seq in enumerate(rows):
                seq.logits.append(host[r])
        return [self._emit(seq, int(tokens[r]), chosen[r], top_ids[r], top_lp[r]) for r, seq in enumerate(rows)]

    def _emit(self, seq: Sequence, token: int, logprob: Any, top_ids: Any, top_lp: Any) -> RequestOutput:
        seq.generated.append(token)
        self.tokens_generated += 1
        p = seq.params
        reason = None
        if token == self.tokenizer.EOS and not p.ignore_eos:
            text, reason = seq.stream.finish(), "stop"
        else:
            text, stopped = seq.stream.add(token)
            if stopped:
                reason = "stop"
            elif len(seq.generated) >= p.max_tokens or len(seq.tokens) >= self.context_limit:
                text, reason = text + seq.stream.finish(), "length"
        logprobs = ()
        if p.logprobs is not None:
            top = {int(i): float(v) for i, v in list(zip(top_ids, top_lp))[: p.logprobs]}
            logprobs = (TokenLogprob(token, float(logprob), top),)
        if reason is not None:
            self._retire(seq)
        return RequestOutput(seq.request_id, text, (token,), logprobs, reason, len(seq.prompt), len(seq.generated))

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: admit, one prefill chunk, one decode step for every
        sequence whose tokens are all cached but the last; the outputs it produced."""
        self._admit()
        outputs: list[RequestOutput] = []
        prefilling = sorted((s for s in self.running.values() if s.pending > 1), key=lambda s: s.arrived)
        if prefilling:
            seq = prefilling[0]
            n = min(seq.pending, self.config.prefill_chunk)
            if self._reserve(seq, seq.cached + n):
                width = next(b for b in self.config.chunk_buckets if b >= n)
                logits = self._run([(seq, n)], width, 1)
                if seq.pending == 0:  # the whole prompt is in: its first token
                    outputs += self._draw([seq], logits, 1)
        decoding = sorted((s for s in self.running.values() if s.pending == 1), key=lambda s: s.arrived)
        ready = [s for s in decoding if s.slot is not None and self._reserve(s, s.cached + 1)]
        ready = [s for s in ready if s.slot is not None]  # a later row's blocks may have preempted an earlier one
        if ready:
            logits = self._run([(s, 1) for s in ready], 1, self.config.max_seqs)
            outputs += self._draw(ready, logits, self.config.max_seqs)
        return outputs
