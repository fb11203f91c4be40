"""The model interface: what the runtime sees of a model, as pure pieces over logical axes.

A family builds a ``LanguageModel`` from parameter specs and four pieces,

    x         = embed(params, tokens, positions, layout)
    x, cache  = block(layer_params, x, positions, cache, layout)      one layer
    logits    = head(params, x, layout)
    sum, n    = loss(params, x, targets, mask, layout)                head + cross-entropy

with the layers' parameters stacked on a leading axis under ``params[layers_key]``. Everything
the runtime does is a composition of these, written once here: ``run_layers`` scans any
contiguous slice of the stack (a pipeline stage is such a slice), ``forward`` and ``loss_sums``
train, ``prefill`` and ``decode_step`` decode with a per-layer KV cache.

Models name logical axes only. A ``Layout`` is how a plan reaches them: ``constrain`` annotates
an activation with its logical axes, and kernels that run per shard are handed the plan's mesh
and activation specs explicitly. The default layout places nothing (one device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mlsys_jax.params import init_params

Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]
Params = Any
Cache = Any

REMAT_POLICIES = ("none", "full", "save_dots")


class ConfigError(ValueError):
    """A model configuration, or a model name, that cannot describe a working model."""


def no_constraint(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    del logical_axes
    return x


@dataclasses.dataclass(frozen=True)
class Layout:
    """How activations are placed, handed to a model's pieces explicitly.

    ``constrain(x, logical_axes)`` annotates an activation; ``mesh`` and
    ``spec(logical_axes, shape, name) -> PartitionSpec`` let a kernel run per shard of an
    activation's placement (both None: no per-shard kernels, e.g. on one device).
    ``layer_weights``, when given, is applied to each layer's weights as the layer scan reads
    them (a train step that syncs gradients itself hooks each layer's backward there).
    """

    constrain: Constrain = no_constraint
    mesh: Any = None
    spec: Callable[..., Any] | None = None
    layer_weights: Callable[[Any], Any] | None = None

    def weights_of_layer(self, weights: Any) -> Any:
        return weights if self.layer_weights is None else self.layer_weights(weights)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None and self.spec is not None


UNPLACED = Layout()


@dataclasses.dataclass(frozen=True)
class LogicalAxes:
    """The logical axes a family names: its parameters' and its activations' (KV caches count
    as activations)."""

    params: tuple[str, ...]
    activations: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """A next-token model as data: the runtime trains, stages and decodes it without knowing its
    family.

    ``specs`` is the tree of ``ParamSpec``; ``embed``, ``block``, ``head`` and ``loss`` are the
    pieces above; ``cache_specs(batch, max_len)`` is the KV cache as a tree of ``ParamSpec``
    (zeros, stacked over layers like the block's parameters). With a ``compute_dtype`` the
    runtime hands the pieces parameters already cast to it, each cast kept in its parameter's
    sharding so that gathers move the narrow copy. ``remat`` is the per-layer activation
    checkpointing policy ``run_layers`` applies; ``flops_per_token(seq_len)`` counts model FLOPs
    for MFU; ``kernel_choices(batch, seq)`` says which kernel backend each hot operation runs.
    ``page_specs(num_blocks, block_size)`` is a paged KV cache's pools (a family that can serve
    from one; its block then takes a ``PagedKV``); ``max_position`` is the longest context the
    model is made for (None: unstated); ``quantizable`` maps each matmul weight's path
    (``layers/wq``) to its input dims, the weights its pieces take stored as int8.
    """

    name: str
    specs: Params
    embed: Callable[[Params, jax.Array, jax.Array, Layout], jax.Array]
    block: Callable[[Params, jax.Array, jax.Array, Cache, Layout], tuple[jax.Array, Cache]]
    head: Callable[[Params, jax.Array, Layout], jax.Array]
    loss: Callable[[Params, jax.Array, jax.Array, jax.Array, Layout], tuple[jax.Array, jax.Array]]
    cache_specs: Callable[[int, int], Any]
    flops_per_token: Callable[[int], float]
    vocab_size: int
    num_layers: int
    axes: LogicalAxes
    config: Any = None
    compute_dtype: Any = None
    remat: str = "none"
    layers_key: str = "layers"
    kernel_choices: Callable[[int, int], dict[str, str]] = lambda batch, seq: {}
    page_specs: Callable[[int, int], Any] | None = None
    max_position: int | None = None
    quantizable: Any = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")


class PagedKV(NamedTuple):
    """A paged KV cache as a block sees it: the pools of fixed-size blocks (``k``, ``v``:
    (layers, num_blocks, block_size, kv_heads, head_dim); inside a block, one pool of every
    layer's blocks whose tables and slots point at the block's own layer) and this call's
    addressing, shared by every layer: ``block_tables``
    (batch, max_blocks) physical block of each row's logical block, ``slots`` (batch, seq) the
    flat pool slot (block * block_size + offset) each new token's key and value is written to,
    ``lengths`` (batch,) how many keys each row has once they are written."""

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    slots: jax.Array
    lengths: jax.Array


# --- compositions of the pieces -------------------------------------------------------------------


def layer_slice(layers: Params, start: int, stop: int) -> Params:
    """Layers [start, stop) of a stacked layer tree (or of a stacked cache)."""
    return jax.tree_util.tree_map(lambda a: a[start:stop], layers)


def _checkpointed(step: Callable, policy: str) -> Callable:
    if policy == "full":
        return jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "save_dots":
        return jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return step


def run_layers(
    model: LanguageModel,
    layers: Params,
    x: jax.Array,
    positions: jax.Array,
    layout: Layout = UNPLACED,
    cache: Cache = None,
) -> tuple[jax.Array, Cache]:
    """Apply the stacked ``layers`` (all of them, or any contiguous slice) in order as one
    ``lax.scan``, so compile time does not grow with depth; ``cache``, when given, is stacked
    the same way (a ``PagedKV``'s pools are; its addressing is shared) and comes back updated."""

    if isinstance(cache, PagedKV):
        return _run_paged(model, layers, x, positions, layout, cache)

    def step(x: jax.Array, inputs: tuple[Params, Cache]) -> tuple[jax.Array, Cache]:
        weights, layer_cache = inputs
        return model.block(layout.weights_of_layer(weights), x, positions, layer_cache, layout)

    return jax.lax.scan(_checkpointed(step, model.remat), x, (layers, cache))


def _merge_layers(pool: Any) -> Any:
    """Stacked pools (layers, num_blocks, ...) seen as one pool (layers * num_blocks, ...): free."""
    return jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), pool)


def _run_paged(
    model: LanguageModel, layers: Params, x: jax.Array, positions: jax.Array, layout: Layout, cache: PagedKV
) -> tuple[jax.Array, PagedKV]:
    """The layer scan over a paged cache, updating the pools in place.

    Every layer's pools are one pool of ``layers * num_blocks`` blocks, carried through the scan;
    layer l's blocks are blocks ``l * num_blocks + b``, so its block tables and slots are offset
    and the block writes and attends over the carried pool directly. Passing the pools as scanned
    inputs and outputs instead would copy them whole every step.
    """
    shape = jax.tree_util.tree_leaves(cache.k)[0].shape
    num_layers, num_blocks, block_size = shape[:3]

    def step(carry: tuple[jax.Array, Any, Any], inputs: tuple[Params, jax.Array]) -> tuple[Any, None]:
        x, k, v = carry
        weights, layer = inputs
        first = layer * num_blocks
        view = PagedKV(k, v, cache.block_tables + first, cache.slots + first * block_size, cache.lengths)
        x, out = model.block(weights, x, positions, view, layout)
        return (x, out.k, out.v), None

    start = (x, _merge_layers(cache.k), _merge_layers(cache.v))
    (x, k, v), _ = jax.lax.scan(
        _checkpointed(step, model.remat), start, (layers, jnp.arange(num_layers, dtype=jnp.int32))
    )
    unmerge = lambda pool, like: jax.tree_util.tree_map(lambda a, b: a.reshape(b.shape), pool, like)
    return x, cache._replace(k=unmerge(k, cache.k), v=unmerge(v, cache.v))


def default_positions(tokens: jax.Array) -> jax.Array:
    """Positions 0..seq-1, shared by every row."""
    return jnp.arange(tokens.shape[1], dtype=jnp.int32)


def extend(
    model: LanguageModel,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Cache,
    layout: Layout = UNPLACED,
) -> tuple[jax.Array, Cache]:
    """Embed tokens at ``positions`` and run them through every layer; with a cache, against it,
    writing their keys and values into it. Returns the final residual stream and the cache.
    Positions are (seq,) for every row alike or (batch, seq), contiguous within a row."""
    x = model.embed(params, tokens, positions, layout)
    return run_layers(model, params[model.layers_key], x, positions, layout, cache)


def hidden_states(
    model: LanguageModel,
    params: Params,
    tokens: jax.Array,
    layout: Layout = UNPLACED,
    positions: jax.Array | None = None,
) -> jax.Array:
    """The residual stream after every layer (before the head's final norm)."""
    positions = default_positions(tokens) if positions is None else positions
    return extend(model, params, tokens, positions, None, layout)[0]


def forward(
    model: LanguageModel,
    params: Params,
    tokens: jax.Array,
    layout: Layout = UNPLACED,
    positions: jax.Array | None = None,
) -> jax.Array:
    """Next-token logits in fp32, (batch, seq, vocab), for int tokens of shape (batch, seq)."""
    return model.head(params, hidden_states(model, params, tokens, layout, positions), layout)


def loss_sums(
    model: LanguageModel, params: Params, batch: dict[str, jax.Array], layout: Layout = UNPLACED
) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, token count) of a batch of ``inputs``, ``targets`` and ``mask``
    (batch, seq): sums, so microbatches add up exactly."""
    x = hidden_states(model, params, batch["inputs"], layout)
    return model.loss(params, x, batch["targets"], batch["mask"], layout)


# --- decoding with a KV cache ---------------------------------------------------------------------


def init_cache(model: LanguageModel, batch: int, max_len: int) -> Cache:
    """An empty (zero) KV cache for ``batch`` rows of up to ``max_len`` positions."""
    return init_params(model.cache_specs(batch, max_len), jax.random.key(0))


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
    """Row b's entry at ``index[b]`` along the sequence axis, keeping it: (batch, 1, ...)."""
    return jnp.take_along_axis(x, index.reshape(-1, 1, *([1] * (x.ndim - 2))), axis=1)


def prefill(
    model: LanguageModel,
    params: Params,
    tokens: jax.Array,
    cache: Cache,
    layout: Layout = UNPLACED,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, Cache]:
    """Fill the cache with prompts (batch, seq), right-padded, starting at position 0.

    Returns the logits of every position (batch, seq, vocab), or with ``lengths`` (batch,) only
    those of each prompt's last token (batch, vocab), and the cache. A padded position's keys
    are written too, but every later query sits at or before them and overwrites them first.
    """
    x, cache = extend(model, params, tokens, default_positions(tokens), cache, layout)
    if lengths is None:
        return model.head(params, x, layout), cache
    return model.head(params, _at(x, lengths - 1), layout)[:, 0], cache


def decode_step(
    model: LanguageModel,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Cache,
    layout: Layout = UNPLACED,
) -> tuple[jax.Array, Cache]:
    """One new token per row, (batch,), at per-row ``positions`` (batch,): its logits
    (batch, vocab) and the cache with its keys and values written."""
    x, cache = extend(model, params, tokens[:, None], positions[:, None], cache, layout)
    return model.head(params, x, layout)[:, 0], cache
