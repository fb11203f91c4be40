"""``mlsys-jax serve`` settings: what to serve, how the engine batches, and where to listen."""

from __future__ import annotations

import dataclasses
from typing import Literal

from mlsys_jax.models.base import ConfigError


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Serve a trained run or a Hugging Face folder behind an OpenAI-compatible API."""

    ckpt_dir: str | None = None
    """A training run's --ckpt-dir (its newest checkpoint, model and tokenizer)."""
    hf: str | None = None
    """Or a local Hugging Face folder (config.json, *.safetensors, tokenizer.json)."""
    step: int | None = None
    """Which checkpoint of --ckpt-dir (default: the newest)."""
    model_name: str | None = None
    """The model id clients name (default: the folder's name)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on."""
    mesh: str | None = None
    """Axis sizes for the engine: 'tensor=T' splits the heads, 'data=R' runs R replicas, each on its own
    T devices (e.g. 'data=2,tensor=2'; default: one device)."""
    simulate_devices: int | None = None
    """CPU devices to simulate (default: as many as --mesh needs)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the served model (and of its KV cache unless --kv-cache int8)."""
    weights: Literal["as-trained", "int8"] = "as-trained"
    """as-trained: the weights in their saved dtype; int8: weight-only int8, one fp32 scale per
    output channel (about half the bytes of bf16), widened to --dtype where used."""
    kv_cache: Literal["auto", "int8"] = "auto"
    """auto: the KV cache in --dtype; int8: int8 blocks with one fp32 scale per block and K/V head
    (a quarter of fp32's bytes), widened to --dtype as attention reads them."""
    paged_attention: Literal["auto", "xla", "pallas"] = "auto"
    """Attention over the KV pages: auto picks per platform (the Pallas kernel on GPU and TPU,
    XLA's gather-then-attend on CPU); xla or pallas forces one (pallas runs interpreted on CPU)."""
    scheduler: Literal["continuous", "dynamic", "static"] = "continuous"
    """continuous: admit into free slots every decode step; dynamic: start a batch at --max-seqs
    requests or after --batch-timeout-ms; static: wait for a full batch of --max-seqs."""
    max_seqs: int = 16
    """Sequences decoded together (the decode program's batch)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int = 512
    """KV-cache blocks in the pool (block_size x num_blocks tokens in all)."""
    prefill_chunk: int = 64
    """Most prompt tokens prefilled per engine step (longer prompts take several steps, so
    decoding never stalls behind them)."""
    batch_timeout_ms: float = 50.0
    """dynamic: the longest the first waiting request waits for others."""
    max_queue: int = 64
    """Waiting requests beyond this get 429 with Retry-After."""
    drain_seconds: float = 30.0
    """On SIGTERM: stop taking requests, give running ones this long to finish."""
    debug: bool = False
    """Show the Python traceback of an error as well as its message."""

    def __post_init__(self) -> None:
        if (self.ckpt_dir is None) == (self.hf is None):
            raise ConfigError("give one of --ckpt-dir (a training run) or --hf (a Hugging Face folder)")
        for name in ("max_seqs", "block_size", "num_blocks", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")
        if self.batch_timeout_ms < 0 or self.drain_seconds < 0:
            raise ConfigError("--batch-timeout-ms and --drain-seconds cannot be negative")
