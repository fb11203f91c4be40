"""Flax modules as ``LanguageModel``s: a user's ``nnx.Module`` (or Linen block through flax's NNX
bridge) trains, plans and checkpoints here unchanged, its logical axes read from its metadata.

The model file stays plain Flax. ``make(rngs) -> nnx.Module`` builds a module with three parts:

    x      = module.embed(tokens, positions)       (batch, seq, d_model)
    x      = block(x, positions)                   each of ``module.layers``, one per layer
    logits = module.head(x)                        (batch, seq, vocab)

``module.layers`` is a list of identically built blocks (``nnx.List``) or one block module built
stacked with ``nnx.vmap``; either way the adapter stacks its parameters on a leading ``layers``
axis so ``run_layers`` scans one block's code. Every variable is an ``nnx.Param`` whose logical
axes come from its sharding metadata (``nnx.with_partitioning(init, ("embed", "mlp"))``, or
Linen's ``nn.with_logical_partitioning``). Decoding with a KV cache is not supported yet.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from flax.nnx import bridge

from mlsys_jax.kernels import cross_entropy
from mlsys_jax.models.base import REMAT_POLICIES, UNPLACED, ConfigError, LanguageModel, Layout, LogicalAxes
from mlsys_jax.models.kernel_ops import IGNORE
from mlsys_jax.models.registry import Family
from mlsys_jax.params import ParamSpec, abstract_params, spec_leaves

Make = Callable[[nnx.Rngs], nnx.Module]
Key = tuple[str, ...]
RESIDUAL = ("batch", "seq", "embed")
LOGITS = ("batch", "seq", "vocab")
ACTIVATIONS = ("batch", "seq", "embed", "vocab")


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One ``nnx.Param``: where it sits in its module's state and in the adapted parameter tree."""

    nnx_path: tuple[Any, ...]  # in the outer module's state, or in one block's
    key: Key  # in the parameter tree (block parameters under the layers key, stacked)
    template: nnx.Variable  # the variable as built: its type and metadata
    shown: str  # its path in the module, as errors name it (a listed block's with index 0)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """A module taken apart: the outer module without its blocks and one block, each a graphdef
    and its parameters, with every parameter's value (blocks' stacked) by tree key."""

    outer_def: Any
    outer: tuple[_Leaf, ...]
    block_def: Any
    block: tuple[_Leaf, ...]
    num_layers: int
    values: dict[Key, Any]


def _shown(path: Iterable[Any]) -> str:
    return "/".join(str(k) for k in path)


def _stack(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    return jnp.stack(values)


def _params_of(state: Any, prefix: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], nnx.Variable]]:
    """(path, variable) of a state, refusing anything but parameters."""
    out = []
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, nnx.Param):
            raise ConfigError(
                f"'{_shown(prefix + tuple(path))}' is an nnx.{type(var).__name__}, not an nnx.Param: an "
                "adapted model's state is its parameters only (no batch statistics, RNG streams or caches). "
                "Fix: keep only nnx.Param variables in the module (build dropout-free blocks, drop stored Rngs)."
            )
        out.append((tuple(path), var))
    return out


def _take_apart(module: nnx.Module, layers: str) -> _Parts:
    """Split ``module`` (abstract or real; consumed) into its outer part and its stacked blocks."""
    blocks = getattr(module, layers, None)
    values: dict[Key, Any]
    if isinstance(blocks, Sequence) and not isinstance(blocks, str):
        if not (blocks and all(isinstance(b, nnx.Module) for b in blocks)):
            raise ConfigError(
                f"{type(module).__name__}.{layers} should be a non-empty list of block modules. Fix: "
                f"self.{layers} = nnx.List([Block(...) for _ in range(n_layers)])."
            )
        split = [nnx.split(b) for b in blocks]
        block_def = split[0][0]
        flats = []
        for i, (graphdef, state) in enumerate(split):
            if graphdef != block_def:
                raise ConfigError(
                    f"'{layers}/{i}' is not built like '{layers}/0', and the layers run as one scanned block. "
                    "Fix: build every block from the same class and arguments."
                )
            flats.append(_params_of(state, (layers, i)))
        first = flats[0]
        for i, flat in enumerate(flats[1:], 1):
            for (path, var), (_, var0) in zip(flat, first, strict=True):
                if var.shape != var0.shape or var.dtype != var0.dtype:
                    raise ConfigError(
                        f"'{_shown((layers, i, *path))}' is {var.dtype}{list(var.shape)} but "
                        f"'{_shown((layers, 0, *path))}' is {var0.dtype}{list(var0.shape)}: stacked layers "
                        "need equal shapes. Fix: build every block with the same sizes."
                    )
        block = [(path, var, _shown((layers, 0, *path))) for path, var in first]
        values = {
            (layers, *map(str, p)): _stack([f[j][1].get_value() for f in flats]) for j, (p, _) in enumerate(first)
        }
        num_layers = len(flats)
    elif isinstance(blocks, nnx.Module):  # built stacked, e.g. with nnx.vmap
        block_def, state = nnx.split(blocks)
        block = [(path, var, _shown((layers, *path))) for path, var in _params_of(state, (layers,))]
        sizes = {var.shape[0] if var.ndim else 0 for _, var, _ in block}
        if len(sizes) != 1 or 0 in sizes:
            raise ConfigError(
                f"'{layers}' is one module, so its parameters must be stacked on a leading axis of one "
                f"size (the number of layers); their leading sizes are {sorted(sizes)}. Fix: build the "
                "blocks with nnx.vmap, or as an nnx.List of blocks."
            )
        num_layers = sizes.pop()
        values = {(layers, *map(str, p)): var.get_value() for p, var, _ in block}
    else:
        raise ConfigError(
            f"{type(module).__name__}.{layers} should hold the per-layer blocks (an nnx.List of identical "
            f"blocks, or one block module built stacked with nnx.vmap); it is {type(blocks).__name__}. "
            f"Fix: keep the blocks in that attribute, or name the attribute with layers=..."
        )
    setattr(module, layers, nnx.List([]))  # the outer part: everything but the blocks
    outer_def, outer_state = nnx.split(module)
    outer = _params_of(outer_state, ())
    values.update({tuple(map(str, p)): var.get_value() for p, var in outer})
    return _Parts(
        outer_def=outer_def,
        outer=tuple(_Leaf(p, tuple(map(str, p)), v, _shown(p)) for p, v in outer),
        block_def=block_def,
        block=tuple(_Leaf(p, (layers, *map(str, p)), v, shown) for p, v, shown in block),
        num_layers=num_layers,
        values=values,
    )


def _build(make: Make, rngs: nnx.Rngs) -> nnx.Module:
    # Logical names only: the plan places the arrays, so flax must not try to shard them itself.
    with nnx.use_eager_sharding(False):
        return make(rngs)


def _abstract_parts(make: Make, layers: str) -> _Parts:
    with nnx.use_eager_sharding(False):
        module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    return _take_apart(module, layers)


def _logical_axes(leaf: _Leaf, ndim: int, stacked: bool, layers: str) -> tuple[str | None, ...]:
    """The leaf's logical axes from its sharding metadata (``layers`` first for a block's)."""
    where = leaf.shown
    names = leaf.template.get_metadata().get("out_sharding")
    per_layer = ndim - 1 if stacked else ndim
    if names is None or (not names and per_layer):
        raise ConfigError(
            f"variable '{where}' has no logical axes, so no plan can place it. Fix: create it with "
            f"nnx.with_partitioning(init, (...)) naming one logical axis per dim (None for a dim never "
            "sharded), or nn.with_logical_partitioning in Linen."
        )
    names = tuple(names)
    if len(names) == ndim and stacked:  # built with nnx.vmap: the stacking axis is named already
        names = names[1:]
    if len(names) != per_layer or not all(n is None or isinstance(n, str) for n in names):
        raise ConfigError(
            f"variable '{where}' of shape {leaf.template.shape} names logical axes {names}: give one "
            "logical axis name (or None) per dim."
        )
    return (layers, *names) if stacked else names


def _nest(items: Iterable[tuple[Key, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = value
    return out


def _at(tree: Any, key: Key) -> Any:
    for k in key:
        tree = tree[k]
    return tree


def _leaf_init(make: Make, layers: str, key: Key) -> Callable[[jax.Array, tuple[int, ...], Any], jax.Array]:
    """An initializer that builds the module under its key and keeps one parameter (under jit the
    rest of the build is dead code)."""

    def init(rng: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        value = _take_apart(_build(make, nnx.Rngs(rng)), layers).values[key]
        assert value.shape == tuple(shape), (key, value.shape, shape)
        return value.astype(dtype)

    return init


def _merge(graphdef: Any, leaves: Sequence[_Leaf], params: Any, drop: int = 0) -> Any:
    """The module of ``graphdef`` holding ``params`` (its leaves at ``key[drop:]``)."""
    state = nnx.from_flat_state(
        [(leaf.nnx_path, leaf.template.replace(_at(params, leaf.key[drop:]))) for leaf in leaves]
    )
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """The four pieces of a ``LanguageModel`` over a taken-apart module."""

    parts: _Parts

    def _outer(self, params: Any) -> Any:
        return _merge(self.parts.outer_def, self.parts.outer, params)

    def embed(self, params: Any, tokens: jax.Array, positions: jax.Array, layout: Layout) -> jax.Array:
        return layout.constrain(self._outer(params).embed(tokens, positions), RESIDUAL)

    def block(
        self, weights: Any, x: jax.Array, positions: jax.Array, cache: Any, layout: Layout
    ) -> tuple[jax.Array, Any]:
        if cache is not None:
            raise _no_cache()
        block = _merge(self.parts.block_def, self.parts.block, weights, drop=1)
        return layout.constrain(block(x, positions), RESIDUAL), None

    def head(self, params: Any, x: jax.Array, layout: Layout) -> jax.Array:
        return layout.constrain(self._outer(params).head(x).astype(jnp.float32), LOGITS)

    def loss(
        self, params: Any, x: jax.Array, targets: jax.Array, mask: jax.Array, layout: Layout
    ) -> tuple[jax.Array, jax.Array]:
        """(sum, count) of next-token cross-entropy of the head's logits where ``mask`` is set."""
        labels = jnp.where(mask > 0, targets, IGNORE)
        options = cross_entropy.LossOptions(ignore_index=IGNORE)
        losses = cross_entropy.token_losses(self.head(params, x, layout), labels, options)
        return jnp.sum(losses), jnp.sum(mask.astype(jnp.float32))


def _no_cache() -> ConfigError:
    return ConfigError(
        "decoding with a KV cache is not supported for adapted Flax modules yet: their blocks take "
        "(x, positions) only. Fix: serve the model's own Flax code, or port it to a family with a cache."
    )


def _cache_specs(batch: int, max_len: int) -> Any:
    raise _no_cache()


def _specs(make: Make, parts: _Parts, layers: str) -> dict[str, Any]:
    items = []
    for leaf, stacked in [(leaf, False) for leaf in parts.outer] + [(leaf, True) for leaf in parts.block]:
        value = parts.values[leaf.key]
        axes = _logical_axes(leaf, len(value.shape), stacked, layers)
        items.append((leaf.key, ParamSpec(tuple(value.shape), axes, _leaf_init(make, layers, leaf.key), value.dtype)))
    return _nest(items)


def matmul_params(specs: Any, layers: str = "layers") -> int:
    """Parameters that take part in a matmul per token: every weight of two or more dims (per
    layer) except a table whose first axis is ``vocab`` (an embedding lookup)."""
    total = 0
    for _, spec in spec_leaves(specs):
        axes = spec.logical_axes[1:] if spec.logical_axes[:1] == (layers,) else spec.logical_axes
        if len(axes) >= 2 and axes[0] != "vocab":
            total += spec.size
    return total


def _check_shapes(pieces: _Pieces, specs: Any, layers: str, vocab_size: int | None) -> int:
    """Run the pieces on shapes alone (one row of two tokens); returns the vocabulary size."""

    def run(params: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        tokens = jnp.zeros((1, 2), jnp.int32)
        positions = jnp.arange(2, dtype=jnp.int32)
        x = pieces.embed(params, tokens, positions, UNPLACED)
        first = jax.tree_util.tree_map(lambda a: a[0], params[layers])
        y, _ = pieces.block(first, x, positions, None, UNPLACED)
        return x, y, pieces.head(params, y, UNPLACED)

    x, y, logits = jax.eval_shape(run, abstract_params(specs))
    if len(x.shape) != 3 or y.shape != x.shape:
        raise ConfigError(
            f"embed(tokens (1, 2), positions) gave {x.shape} and a block turned it into {y.shape}: the "
            "residual stream must be (batch, seq, d_model) in and out of every block."
        )
    if logits.shape[:2] != (1, 2) or len(logits.shape) != 3:
        raise ConfigError(f"head(x) must give (batch, seq, vocab) logits; it gave {logits.shape} for x {x.shape}")
    if vocab_size is not None and logits.shape[2] != vocab_size:
        raise ConfigError(f"vocab_size={vocab_size} but the head gives {logits.shape[2]} logits per token")
    return int(logits.shape[2])


def from_nnx(
    make: Make,
    *,
    name: str = "flax",
    layers: str = "layers",
    config: Any = None,
    compute_dtype: Any = None,
    remat: str = "none",
    vocab_size: int | None = None,
    flops_per_token: Callable[[int], float] | None = None,
) -> LanguageModel:
    """The ``LanguageModel`` of the module ``make(rngs)`` builds (see the module's docstring).

    ``make`` is a constructor, not a module: it is built on shapes alone for specs and plans, and
    under the key of ``init_params`` for real weights. ``flops_per_token`` defaults to 6 x
    ``matmul_params`` (attention's score FLOPs are not counted)."""
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
    parts = _abstract_parts(make, layers)
    specs = _specs(make, parts, layers)
    pieces = _Pieces(parts)
    vocab = _check_shapes(pieces, specs, layers, vocab_size)
    matmuls = matmul_params(specs, layers)
    names = {a for _, s in spec_leaves(specs) for a in s.logical_axes if a is not None}
    return LanguageModel(
        name=name,
        specs=specs,
        embed=pieces.embed,
        block=pieces.block,
        head=pieces.head,
        loss=pieces.loss,
        cache_specs=_cache_specs,
        flops_per_token=flops_per_token or (lambda seq_len: 6.0 * matmuls),
        vocab_size=vocab,
        num_layers=parts.num_layers,
        axes=LogicalAxes(params=tuple(sorted(names)), activations=ACTIVATIONS),
        config=config,
        compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype),
        remat=remat,
        layers_key=layers,
    )


def from_linen(module: linen.Module, *example_args: Any, rngs: nnx.Rngs) -> nnx.Module:
    """A Linen module as an NNX module, for use inside ``make``: typically one per-layer block
    (``nnx.List([from_linen(Block(cfg), x, positions, rngs=rngs) for _ in range(n)])``).

    It goes through ``flax.nnx.bridge.ToNNX`` and is initialized by running it once on
    ``example_args`` (only their shapes matter); its ``nn.with_logical_partitioning`` names
    become the logical axes. The block is the granularity because a Linen model is one sealed
    ``__call__``, while the adapter needs the embedding, each layer and the head apart."""
    wrapped = bridge.ToNNX(module, rngs=rngs)
    bridge.lazy_init(wrapped, *example_args)
    wrapped.to_nnx__rngs = None  # its parameters exist now; keep no RNG state in the model
    return wrapped


def flax_family(
    name: str, make: Callable[[Any, nnx.Rngs], nnx.Module], presets: Mapping[str, Any], *, layers: str = "layers"
) -> Family:
    """A model family over ``make(config, rngs)``, for ``register_family``: its presets are
    configs of one dataclass, whose ``dtype`` and ``remat`` fields (when it has them) set the
    compute dtype and the activation checkpointing."""
    if not presets:
        raise ConfigError(f"family {name!r} needs at least one preset")
    config_type = type(next(iter(presets.values())))

    def build(cfg: Any, model_name: str = name) -> LanguageModel:
        return from_nnx(
            functools.partial(make, cfg),
            name=model_name,
            layers=layers,
            config=cfg,
            compute_dtype=getattr(cfg, "dtype", None),
            remat=getattr(cfg, "remat", "none"),
        )

    params: set[str] = set()
    for cfg in presets.values():
        parts = _abstract_parts(functools.partial(make, cfg), layers)
        for _, spec in spec_leaves(_specs(functools.partial(make, cfg), parts, layers)):
            params.update(a for a in spec.logical_axes if a is not None)
    return Family(name, config_type, presets, LogicalAxes(tuple(sorted(params)), ACTIVATIONS), build)
