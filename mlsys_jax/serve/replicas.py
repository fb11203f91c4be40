"""Data-parallel serving: one engine per group of devices, each request to the least loaded.

Every replica holds the whole model (split over its own devices by tensor parallelism) and its
own KV cache; a request lives on one replica from admission to its end.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlsys_jax.serve.engine import Engine
from mlsys_jax.serve.requests import RequestOutput, SamplingParams
from mlsys_jax.tokenizer import Tokenizer


class Replicas:
    """Several engines behind the single-engine interface the runner drives."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("Replicas needs at least one engine")
        self.engines = list(engines)
        self.owner: dict[str, Engine] = {}

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engines[0].tokenizer

    @property
    def context_limit(self) -> int:
        return self.engines[0].context_limit

    @property
    def model_name(self) -> str:
        return self.engines[0].model_name

    def load(self, engine: Engine) -> int:
        return len(engine.waiting) + len(engine.running)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        engine = min(self.engines, key=self.load)
        engine.add_request(request_id, prompt_ids, params)
        self.owner[request_id] = engine

    def abort(self, request_id: str) -> None:
        engine = self.owner.pop(request_id, None)
        if engine is not None:
            engine.abort(request_id)

    def step(self) -> list[RequestOutput]:
        outputs = [out for engine in self.engines if engine.has_work() for out in engine.step()]
        for out in outputs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        return outputs

    def has_work(self) -> bool:
        return any(engine.has_work() for engine in self.engines)

    def stats(self) -> dict[str, float]:
        each = [engine.stats() for engine in self.engines]
        return {key: sum(s[key] for s in each) for key in each[0]}
