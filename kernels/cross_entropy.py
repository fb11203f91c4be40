"""``linear_cross_entropy``: the LM-head matmul and the cross-entropy fused, forward and backward.

    loss_t = lse_t - logit_t[label_t] + z_loss * lse_t^2,   logits = hidden @ weight (fp32)

The unfused reference builds the whole (tokens, vocab) logits array, which for a 32k-128k vocab
is the largest activation of a language model. The fused backends never do: they are built from
two chunked primitives,

    stats(h, w, labels) -> (lse, label_logit)                     online log-sum-exp over vocab tiles
    grads(h, w, labels, lse, coef, g_label) -> (dh, dw)            dlogits recomputed per tile

and ``fused_vjp`` turns any such pair into one differentiable, vocab-parallel loss: with
``vocab_axis`` (inside ``jax.shard_map``) ``weight`` is this shard's contiguous slice of the
vocabulary, the shards' log-sum-exps are combined (pmax, psum of exp), label logits are psummed,
and dh is psummed in the backward while each shard's dw stays local.

Labels equal to ``ignore_index`` give loss 0 and no gradient. Any other label outside [0, V)
cannot be caught at trace time; it is treated as having logit 0 (loss = lse + z_loss * lse^2,
gradient = the softmax), the same in every backend.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mlsys_jax.kernels import cross_entropy_pallas as _pallas
from mlsys_jax.kernels.autotune import resolve_blocks
from mlsys_jax.kernels.configs import LossBlocks
from mlsys_jax.kernels.dispatch import Backend, Registry

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "LINEAR_CROSS_ENTROPY",
           "LossOptions", "fused_vjp", "chunked_stats", "chunked_grads", "choose",
           "CHUNKED_BLOCKS"]

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

LINEAR_CROSS_ENTROPY = Registry("linear_cross_entropy", {
    "gpu": ("pallas_triton", "chunked", "xla"),
    "tpu": ("pallas_tpu", "chunked", "xla"),
    "cpu": ("chunked", "xla"),
})

#: Chunks of the pure-XLA backend when no blocks are given: each step of its loops is one
#: XLA matmul, so its tiles are much larger than a Pallas kernel's (here 8 MiB of fp32 logits).
CHUNKED_BLOCKS = LossBlocks(block_tokens=1024, block_vocab=2048)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Everything static about one call, handed to a backend."""

    ignore_index: int = -100
    z_loss: float = 0.0
    vocab_axis: tuple[str, ...] | None = None
    blocks: LossBlocks = LossBlocks()
    interpret: bool = False


Stats = Callable[..., tuple[jax.Array, jax.Array]]
Grads = Callable[..., tuple[jax.Array, jax.Array]]


# --- varying-manual-axes bookkeeping (shard_map's check_vma) -------------------------------------

def _vma(x: Any) -> frozenset:
    """The mesh axes ``x`` varies over inside shard_map (empty outside, or without check_vma)."""
    return _pallas.varying_axes(x)


def _vary_like(x: jax.Array, *like: Any) -> jax.Array:
    """``x`` marked as varying over every mesh axis any of ``like`` varies over (a no-op outside
    shard_map), so loop carries and kernel operands have one consistent type."""
    axes = frozenset().union(*(_vma(a) for a in like)) - _vma(x)
    if not axes:
        return x
    pcast = getattr(lax, "pcast", None)
    if pcast is not None:
        return pcast(x, tuple(sorted(axes)), to="varying")
    return lax.pvary(x, tuple(sorted(axes)))


def _sum_to_vma_of(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the mesh axes its primal is invariant over (e.g. dw of a weight
    replicated over the data axis is the sum of every data shard's dw)."""
    extra = _vma(ct) - _vma(primal)
    return lax.psum(ct, tuple(sorted(extra))) if extra else ct


# --- the reference -----------------------------------------------------------------------------

def _vocab_offset(vocab_local: int, vocab_axis: tuple[str, ...] | None) -> jax.Array | int:
    return 0 if vocab_axis is None else lax.axis_index(vocab_axis) * vocab_local


def linear_cross_entropy_reference(hidden: jax.Array, weight: jax.Array, labels: jax.Array,
                                   opts: LossOptions = LossOptions()) -> jax.Array:
    """Per-token loss (tokens,) fp32 from full fp32 logits; hidden (tokens, D), weight (D, V).

    The specification of every backend, and the ``xla`` backend (JAX differentiates it).
    """
    logits = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)
    vocab = weight.shape[1]
    local = labels - _vocab_offset(vocab, opts.vocab_axis)
    mine = (local >= 0) & (local < vocab)
    label_logit = jnp.take_along_axis(logits, jnp.clip(local, 0, vocab - 1)[:, None], axis=1)[:, 0]
    label_logit = jnp.where(mine, label_logit, 0.0)
    if opts.vocab_axis is None:
        lse = jax.nn.logsumexp(logits, axis=1)
    else:
        m = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=1)), opts.vocab_axis)
        lse = m + jnp.log(lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), axis=1), opts.vocab_axis))
        label_logit = lax.psum(label_logit, opts.vocab_axis)
    loss = lse - label_logit + opts.z_loss * lse**2
    return jnp.where(labels == opts.ignore_index, 0.0, loss)


# --- the fused loss from two primitives ----------------------------------------------------------

def fused_vjp(stats: Stats, grads: Grads) -> Callable[..., jax.Array]:
    """A differentiable per-token loss ``loss(h, w, labels, opts)`` from the two primitives
    ``stats(h, w, labels_local, opts)`` and ``grads(h, w, labels_local, lse, coef, g_label, opts)``.

    ``labels_local`` is the label's column in this vocabulary shard, or -1 when the token is
    ignored or its label lives in another shard.
    """

    def forward(h, w, labels, opts):
        vocab = w.shape[1]
        valid = labels != opts.ignore_index
        local = labels - _vocab_offset(vocab, opts.vocab_axis)
        labels_local = jnp.where(valid & (local >= 0) & (local < vocab), local, -1).astype(jnp.int32)
        lse, label_logit = stats(h, w, labels_local, opts)
        if opts.vocab_axis is not None:
            m = lax.pmax(lse, opts.vocab_axis)
            lse = m + jnp.log(lax.psum(jnp.exp(lse - m), opts.vocab_axis))
            label_logit = lax.psum(label_logit, opts.vocab_axis)
        loss = jnp.where(valid, lse - label_logit + opts.z_loss * lse**2, 0.0)
        return loss, (h, w, labels_local, valid, lse)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def loss(h, w, labels, opts):
        return forward(h, w, labels, opts)[0]

    def loss_bwd(opts, res, g):
        h, w, labels_local, valid, lse = res
        # Under shard_map(check_vma=True) the weight's type says it varies over the vocabulary
        # axes. Without that checking, shard_map's transpose hands each vocabulary shard 1/T of
        # the loss's cotangent and sums dh and dw over the axes their inputs are replicated on
        # itself: undo the split, and leave the sums to it.
        tracked = opts.vocab_axis is None or set(opts.vocab_axis) <= _vma(w)
        if not tracked:
            g = lax.psum(g, opts.vocab_axis)
        g = jnp.where(valid, g.astype(jnp.float32), 0.0)
        coef = g * (1.0 + 2.0 * opts.z_loss * lse)
        dh, dw = grads(h, w, labels_local, lse, coef, g, opts)
        if opts.vocab_axis is not None and tracked:
            dh = lax.psum(dh, opts.vocab_axis)
        return _sum_to_vma_of(dh, h), _sum_to_vma_of(dw, w), None

    loss.defvjp(forward, loss_bwd)
    return loss


# --- the chunked pure-XLA primitives ------------------------------------------------------------

def _chunks(size: int, block: int) -> tuple[int, int]:
    """(chunk, count): chunks of at most ``block`` covering ``size``; the last one is shifted
    back to end at ``size`` (so no array is padded) and overlaps its predecessor."""
    chunk = max(1, min(block, size))
    return chunk, -(-size // chunk)


def _chunk_logits(hc: jax.Array, w: jax.Array, j: jax.Array, bv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Logits of token chunk ``hc`` against vocab chunk ``j``: (column ids, logits, fresh) where
    ``fresh`` marks columns no earlier chunk covered."""
    v0 = jnp.minimum(j * bv, w.shape[1] - bv)
    wj = lax.dynamic_slice_in_dim(w, v0, bv, axis=1)
    cols = v0 + jnp.arange(bv, dtype=jnp.int32)
    logits = jnp.dot(hc, wj, preferred_element_type=jnp.float32)
    return cols, logits, cols >= j * bv


def chunked_stats(h: jax.Array, w: jax.Array, labels: jax.Array, opts: LossOptions
                  ) -> tuple[jax.Array, jax.Array]:
    """(lse, label_logit) over this shard's vocabulary by token chunks and an online
    log-sum-exp over vocab chunks; the largest array made is one (block_tokens, block_vocab) tile."""
    n = h.shape[0]
    bt, nt = _chunks(n, opts.blocks.block_tokens)
    bv, nv = _chunks(w.shape[1], opts.blocks.block_vocab)

    def token_chunk(i):
        t0 = jnp.minimum(i * bt, n - bt)
        hc = lax.dynamic_slice_in_dim(h, t0, bt)
        lc = lax.dynamic_slice_in_dim(labels, t0, bt)

        def vocab_chunk(carry, j):
            m, s, ll = carry
            cols, logits, fresh = _chunk_logits(hc, w, j, bv)
            logits = jnp.where(fresh[None, :], logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=1))
            s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
            is_label = (cols[None, :] == lc[:, None]) & fresh[None, :]
            ll = ll + jnp.sum(jnp.where(is_label, logits, 0.0), axis=1)
            return (m_new, s, ll), None

        init = (jnp.full((bt,), -jnp.inf, jnp.float32), jnp.zeros((bt,), jnp.float32),
                jnp.zeros((bt,), jnp.float32))
        init = tuple(_vary_like(x, hc, w, lc) for x in init)
        (m, s, ll), _ = lax.scan(vocab_chunk, init, jnp.arange(nv))
        return t0, m + jnp.log(s), ll

    def step(carry, i):
        lse_all, ll_all = carry
        t0, lse, ll = token_chunk(i)
        return (lax.dynamic_update_slice_in_dim(lse_all, lse, t0, 0),
                lax.dynamic_update_slice_in_dim(ll_all, ll, t0, 0)), None

    zeros = _vary_like(jnp.zeros((n,), jnp.float32), h, w, labels)
    (lse, ll), _ = lax.scan(step, (zeros, zeros), jnp.arange(nt))
    return lse, ll


def chunked_grads(h: jax.Array, w: jax.Array, labels: jax.Array, lse: jax.Array, coef: jax.Array,
                  g_label: jax.Array, opts: LossOptions) -> tuple[jax.Array, jax.Array]:
    """(dh, dw) with dlogits = softmax * coef - onehot * g_label recomputed per tile, in two
    passes that each own their output: dh by token chunk (summing over vocab chunks), dw by vocab
    chunk (summing over token chunks). Only one chunk of either is ever held in fp32."""
    n, d = h.shape
    vocab = w.shape[1]
    bt, nt = _chunks(n, opts.blocks.block_tokens)
    bv, nv = _chunks(vocab, opts.blocks.block_vocab)
    like = (h, w, labels, lse, coef, g_label)

    def token_rows(i):
        t0 = jnp.minimum(i * bt, n - bt)
        rows = tuple(lax.dynamic_slice_in_dim(x, t0, bt) for x in like if x is not w)
        return t0, (t0 + jnp.arange(bt)) >= i * bt, rows

    def dlogits(rows, j):
        hc, lc, lsec, cc, gc = rows
        cols, logits, fresh = _chunk_logits(hc, w, j, bv)
        dl = jnp.exp(logits - lsec[:, None]) * cc[:, None]
        return cols[0], fresh, dl - jnp.where(cols[None, :] == lc[:, None], gc[:, None], 0.0)

    def dh_chunk(dh, i):
        t0, _, rows = token_rows(i)

        def add(acc, j):
            v0, fresh, dl = dlogits(rows, j)
            dl = jnp.where(fresh[None, :], dl, 0.0).astype(w.dtype)  # columns not yet added
            wj = lax.dynamic_slice_in_dim(w, v0, bv, axis=1)
            return acc + jnp.dot(dl, wj.T, preferred_element_type=jnp.float32), None

        acc = _vary_like(jnp.zeros((bt, d), jnp.float32), *like)
        acc, _ = lax.scan(add, acc, jnp.arange(nv))
        return lax.dynamic_update_slice_in_dim(dh, acc.astype(h.dtype), t0, 0), None

    def dw_chunk(dw, j):
        v0 = jnp.minimum(j * bv, vocab - bv)

        def add(acc, i):
            _, fresh_rows, rows = token_rows(i)
            _, _, dl = dlogits(rows, j)
            dl = jnp.where(fresh_rows[:, None], dl, 0.0).astype(h.dtype)  # rows not yet added
            return acc + jnp.dot(rows[0].T, dl, preferred_element_type=jnp.float32), None

        acc = _vary_like(jnp.zeros((d, bv), jnp.float32), *like)
        acc, _ = lax.scan(add, acc, jnp.arange(nt))
        return lax.dynamic_update_slice_in_dim(dw, acc.astype(w.dtype), v0, axis=1), None

    dh, _ = lax.scan(dh_chunk, _vary_like(jnp.zeros((n, d), h.dtype), *like), jnp.arange(nt))
    dw, _ = lax.scan(dw_chunk, _vary_like(jnp.zeros((d, vocab), w.dtype), *like), jnp.arange(nv))
    return dh, dw


# --- backends ----------------------------------------------------------------------------------

def _dtype_check(*, dtype, **_) -> str | None:
    if jnp.dtype(dtype) not in FLOAT_DTYPES:
        return f"takes float32, bfloat16 or float16, not {jnp.dtype(dtype).name}"
    return None


LINEAR_CROSS_ENTROPY.register(Backend("xla", ("cpu", "gpu", "tpu"), linear_cross_entropy_reference,
                                      _dtype_check))
LINEAR_CROSS_ENTROPY.register(Backend("chunked", ("cpu", "gpu", "tpu"),
                                      fused_vjp(chunked_stats, chunked_grads), _dtype_check))


def _check_pallas_blocks(name: str, blocks: LossBlocks, vocab_multiple: int) -> None:
    for field in ("block_tokens", "block_vocab"):
        value = getattr(blocks, field)
        if value & (value - 1) or value < _pallas.MIN_BLOCK_TOKENS:
            raise ValueError(
                f"linear_cross_entropy[{name}]: blocks.{field}={value} must be a power of two >= "
                f"{_pallas.MIN_BLOCK_TOKENS} (the kernel's tiles). Fix: e.g. LossBlocks(64, 256)."
            )
    if blocks.block_vocab % vocab_multiple:
        raise ValueError(
            f"linear_cross_entropy[{name}]: blocks.block_vocab={blocks.block_vocab} must be a "
            f"multiple of {vocab_multiple}. Fix: use a larger block_vocab."
        )


def _pallas_backend(name: str, platforms: tuple[str, ...], stats: Stats, grads: Grads,
                    vocab_multiple: int) -> Backend:
    def kw(opts: LossOptions) -> dict[str, Any]:
        b = opts.blocks
        return dict(block_tokens=b.block_tokens, block_vocab=b.block_vocab,
                    num_warps=b.num_warps, num_stages=b.num_stages, interpret=opts.interpret)

    def stats_(h, w, labels, opts):
        return stats(*_common_vma(h, w, labels), **kw(opts))

    def grads_(h, w, labels, lse, coef, g_label, opts):
        return grads(*_common_vma(h, w, labels, lse, coef, g_label), **kw(opts))

    loss = fused_vjp(stats_, grads_)

    def run(h, w, labels, opts, *, interpret: bool = False):
        _check_pallas_blocks(name, opts.blocks, vocab_multiple)
        return loss(h, w, labels, dataclasses.replace(opts, interpret=interpret))

    return Backend(name, platforms, run, _dtype_check, interpretable=True)


def _common_vma(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Operands of one pallas_call made to vary over the same mesh axes."""
    return tuple(_vary_like(x, *xs) for x in xs)


LINEAR_CROSS_ENTROPY.register(_pallas_backend("pallas_triton", ("gpu",), _pallas.triton_stats,
                                              _pallas.triton_grads, 1))
LINEAR_CROSS_ENTROPY.register(_pallas_backend("pallas_tpu", ("tpu",), _pallas.tpu_stats,
                                              _pallas.tpu_grads, _pallas.MIN_BLOCK_VOCAB["tpu"]))


# --- the public function ------------------------------------------------------------------------

def _check_inputs(hidden, weight, labels, ignore_index, z_loss, vocab_axis) -> tuple[str, ...] | None:
    where = "linear_cross_entropy"
    if hidden.ndim < 1 or weight.ndim != 2:
        raise ValueError(f"{where}: hidden must be (..., D) and weight (D, V); got shapes "
                         f"{hidden.shape} and {weight.shape}")
    if weight.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"{where}: weight {weight.shape} must be (D, V) with D = hidden.shape[-1] = "
            f"{hidden.shape[-1]}. Fix: pass the LM head as (d_model, vocab) (transpose an "
            "embedding table first)."
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{where}: labels {labels.shape} must have hidden's leading shape "
                         f"{hidden.shape[:-1]}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{where}: labels must be integers, got {labels.dtype}")
    for name, x in (("hidden", hidden), ("weight", weight)):
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"{where}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{where}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share "
                         "a dtype. Fix: cast the weight to the activations' dtype.")
    if not isinstance(ignore_index, int):
        raise ValueError(f"{where}: ignore_index must be a Python int, got {ignore_index!r}")
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"{where}: z_loss must be a non-negative Python float, got {z_loss!r}")
    if vocab_axis is None:
        return None
    return (vocab_axis,) if isinstance(vocab_axis, str) else tuple(vocab_axis)


def choose(hidden: jax.Array, weight: jax.Array, *, implementation: str | None = None,
           vocab_axis: Any = None):
    """The backend ``linear_cross_entropy`` would run for these arguments (see ``Choice.describe``)."""
    return LINEAR_CROSS_ENTROPY.choose(implementation, dtype=hidden.dtype, d_model=hidden.shape[-1],
                                       vocab=weight.shape[-1], vocab_parallel=vocab_axis is not None)


def linear_cross_entropy(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *,
                         ignore_index: int = -100, z_loss: float = 0.0,
                         implementation: str | None = None, blocks: LossBlocks | None = None,
                         vocab_axis: str | tuple[str, ...] | None = None) -> jax.Array:
    """Per-token cross-entropy of ``hidden @ weight`` against ``labels``, fp32, shape labels.shape.

    hidden (..., D) and weight (D, V) share a float dtype; labels (...) are ints. Tokens labelled
    ``ignore_index`` give 0 and no gradient. ``z_loss`` adds z_loss * lse^2. ``vocab_axis`` (inside
    ``jax.shard_map``) says ``weight`` is this shard's contiguous vocabulary slice along that mesh
    axis (or axes). ``implementation``: None picks the best backend here ("chunked" on CPU),
    "pallas" the best Pallas one, or a name ("xla", "chunked", "pallas_triton", "pallas_tpu").
    """
    axis = _check_inputs(hidden, weight, labels, ignore_index, z_loss, vocab_axis)
    choice = choose(hidden, weight, implementation=implementation, vocab_axis=axis)
    name = choice.backend.name
    if blocks is None:
        blocks = resolve_blocks("linear_cross_entropy", name, LossBlocks, hidden, weight,
                                default=CHUNKED_BLOCKS if name == "chunked" else None)
    opts = LossOptions(ignore_index=ignore_index, z_loss=float(z_loss), vocab_axis=axis, blocks=blocks)
    h2d = hidden.reshape(-1, hidden.shape[-1])
    loss = choice(h2d, weight, labels.reshape(-1).astype(jnp.int32), opts)
    return loss.reshape(labels.shape)
