"""Pallas kernels of RMSNorm and LayerNorm, forward and backward: one kernel body for the Triton
and TPU lowerings, and the ``custom_vjp`` that makes them one differentiable norm.

Rows are flattened to (N, D) and every tile holds whole feature rows, so the per-row statistics
(mean, rstd) are computed in one pass. The forward saves them in fp32; the backward reuses them
instead of recomputing the reductions.

Why the backward is fast on GPU: its cost is the weight (and bias) gradient, a reduction over
all N rows. Reducing it column by column in a second kernel (as some shipped kernels do) re-reads
x and dy in a transposed, poorly coalesced order; reducing it with atomics serializes on D
addresses. Here each program walks ``steps`` consecutive row tiles in an in-kernel loop, keeps its
share of dw/db in fp32 registers, and writes one (1, D) partial at the end. With a few hundred
programs the partials are a few MiB against the GiB of x, dy and dx that have to move anyway, so
the backward stays one streaming pass over x and dy, and the wrapper sums the partials with one
small XLA reduction. On TPU the same tile body runs once per grid step instead, and the partial
stays resident in VMEM across the sequential ("arbitrary") grid axis, the usual accumulator shape.

Layout rules followed: Triton needs power-of-two tile dims, so D is padded up to a power of two
and padded columns are masked out of every statistic; TPU needs the last two block dims to be
multiples of (8, 128) or full, so blocks are (block_rows, D) with D whole. Rows are padded with
zeros up to whole tiles (a zero row contributes nothing to dw or db since its dy is zero).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlsys_jax.kernels.lowering import tpu_interpret, tpu_params, triton_params
from mlsys_jax.kernels.norms.options import NormBlocks

TRITON = "triton"
TPU = "tpu"
LOWERINGS = (TRITON, TPU)

# At most this many programs share the backward's reduction; more rows per program beyond it.
DEFAULT_MAX_PROGRAMS = 1024


@dataclasses.dataclass(frozen=True)
class NormKernelOptions:
    """Everything static about one fused-norm call."""

    norm: str  # "rms" or "layer"
    eps: float
    blocks: NormBlocks = NormBlocks()
    lowering: str = TRITON
    interpret: bool = False
    max_programs: int = DEFAULT_MAX_PROGRAMS

    def __post_init__(self) -> None:
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}, got {self.lowering!r}")
        if self.max_programs < 1:
            raise ValueError(f"max_programs must be a positive int, got {self.max_programs!r}")


def check_blocks(blocks: NormBlocks, lowering: str) -> None:
    """Raise if ``blocks`` breaks the tiling rules of ``lowering``."""
    rows = blocks.block_rows
    if lowering == TRITON and rows & (rows - 1):
        raise ValueError(
            f"NormBlocks.block_rows={rows}: Triton tiles need a power of two. "
            f"Fix: use {1 << (rows.bit_length() - 1)} or {1 << rows.bit_length()}."
        )
    if lowering == TPU and rows % 8:
        raise ValueError(
            f"NormBlocks.block_rows={rows}: TPU blocks need a multiple of 8 rows. Fix: use {max(8, rows // 8 * 8)}."
        )


def padded_features(d: int, lowering: str) -> int:
    """The tile width for feature dim ``d``: the next power of two on Triton, ``d`` on TPU."""
    return pl.next_power_of_2(d) if lowering == TRITON else d


# --- tile bodies (shared by both lowerings) -------------------------------------------------------


def _column_mask(d: int, width: int) -> jax.Array | None:
    """True for real feature columns of a padded tile; None when nothing is padded."""
    if width == d:
        return None
    return (jnp.arange(width, dtype=jnp.int32) < d)[None, :]


def _forward_tile(x, w, b, *, norm: str, eps: float, d: int):
    """y, mean, rstd of a (rows, width) fp32 tile whose columns past ``d`` are zero."""
    mask = _column_mask(d, x.shape[-1])
    if norm == "rms":
        mean = None
        xc = x
    else:
        mean = jnp.sum(x, axis=-1, keepdims=True) * (1.0 / d)
        xc = x - mean
        if mask is not None:
            xc = jnp.where(mask, xc, 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=-1, keepdims=True) * (1.0 / d) + eps)
    y = xc * rstd * w
    if b is not None:
        y = y + b
    return y, mean, rstd


def _backward_tile(x, w, mean, rstd, dy, *, norm: str, d: int):
    """dx of a tile and its row sums of dw (and db for LayerNorm), all fp32, shapes (1, width)."""
    mask = _column_mask(d, x.shape[-1])
    xc = x if mean is None else x - mean
    if mask is not None and mean is not None:
        xc = jnp.where(mask, xc, 0.0)
    xhat = xc * rstd
    g = dy * w  # zero in padded columns since w is padded with zeros
    c1 = jnp.sum(g * xhat, axis=-1, keepdims=True) * (1.0 / d)
    if norm == "rms":
        dx = rstd * (g - xhat * c1)
    else:
        c2 = jnp.sum(g, axis=-1, keepdims=True) * (1.0 / d)
        dx = rstd * (g - c2 - xhat * c1)
    dw = jnp.sum(dy * xhat, axis=0, keepdims=True)
    db = None if norm == "rms" else jnp.sum(dy, axis=0, keepdims=True)
    return dx, dw, db


# --- kernels --------------------------------------------------------------------------------------


def _forward_kernel(*refs, norm: str, eps: float, d: int):
    if norm == "rms":
        x_ref, w_ref, y_ref, rstd_ref = refs
        b_ref = mean_ref = None
    else:
        x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref = refs
    x = x_ref[...].astype(jnp.float32)
    w = w_ref[...].astype(jnp.float32)
    b = None if b_ref is None else b_ref[...].astype(jnp.float32)
    y, mean, rstd = _forward_tile(x, w, b, norm=norm, eps=eps, d=d)
    y_ref[...] = y.astype(y_ref.dtype)
    rstd_ref[...] = rstd
    if mean_ref is not None:
        mean_ref[...] = mean


def _backward_kernel(*refs, norm: str, d: int, sub_rows: int, accumulate: bool):
    """Walks the block's row tiles of ``sub_rows`` rows, summing dw/db into the program's partials.

    With ``accumulate`` (TPU) the partial block is the same for every step of grid axis 1 and
    sums across it; otherwise (Triton) that axis has one step, the walk is the in-kernel loop, and
    the partial is written once, never read back.
    """
    if norm == "rms":
        x_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
        mean_ref = db_ref = None
    else:
        x_ref, w_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dw_ref, db_ref = refs
    w = w_ref[...].astype(jnp.float32)
    width = x_ref.shape[-1]

    def tile(rows):
        x = x_ref[rows, :].astype(jnp.float32)
        dy = dy_ref[rows, :].astype(jnp.float32)
        mean = None if mean_ref is None else mean_ref[rows, :]
        dx, dw, db = _backward_tile(x, w, mean, rstd_ref[rows, :], dy, norm=norm, d=d)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return dw, db

    steps = x_ref.shape[0] // sub_rows
    zero = jnp.zeros((1, width), jnp.float32)
    if steps == 1:
        dw, db = tile(slice(None))
    else:

        def step(i, carry):
            start = pl.multiple_of(i * sub_rows, sub_rows)
            dw_i, db_i = tile(pl.ds(start, sub_rows))
            return carry[0] + dw_i, (None if db_i is None else carry[1] + db_i)

        dw, db = jax.lax.fori_loop(0, steps, step, (zero, None if db_ref is None else zero))

    if not accumulate:
        dw_ref[0] = dw
        if db_ref is not None:
            db_ref[0] = db
        return

    @pl.when(pl.program_id(1) == 0)
    def _init():
        dw_ref[0] = zero
        if db_ref is not None:
            db_ref[0] = zero

    dw_ref[0] = dw_ref[0] + dw
    if db_ref is not None:
        db_ref[0] = db_ref[0] + db


# --- calls ----------------------------------------------------------------------------------------


def _pad(a: jax.Array, rows: int, cols: int) -> jax.Array:
    pad_r, pad_c = rows - a.shape[0], cols - a.shape[1]
    return a if pad_r == 0 and pad_c == 0 else jnp.pad(a, ((0, pad_r), (0, pad_c)))


def _interpret_arg(opts: NormKernelOptions):
    return tpu_interpret(opts.interpret) if opts.lowering == TPU else opts.interpret


def _compiler_params(opts: NormKernelOptions, semantics: tuple[str, ...]):
    if opts.lowering == TRITON:
        return triton_params(num_warps=opts.blocks.num_warps)
    return tpu_params(semantics)


def _row_vector(v: jax.Array, width: int) -> jax.Array:
    return _pad(v.reshape(1, -1), 1, width)


def norm_forward(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, opts: NormKernelOptions
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """y (N, D) in x's dtype, and fp32 mean (N, 1) (None for RMSNorm) and rstd (N, 1) of x (N, D)."""
    n, d = x.shape
    rows = opts.blocks.block_rows
    width = padded_features(d, opts.lowering)
    num_blocks = pl.cdiv(n, rows)
    xp = _pad(x, num_blocks * rows, width)
    params = [_row_vector(weight, width)]
    if opts.norm == "layer":
        assert bias is not None, "LayerNorm takes a bias"
        params.append(_row_vector(bias, width))

    tile = pl.BlockSpec((rows, width), lambda i: (i, 0))
    vector = pl.BlockSpec((1, width), lambda i: (0, 0))
    stat = pl.BlockSpec((rows, 1), lambda i: (i, 0))
    stat_shape = jax.ShapeDtypeStruct((num_blocks * rows, 1), jnp.float32)
    n_stats = 1 if opts.norm == "rms" else 2
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, norm=opts.norm, eps=opts.eps, d=d),
        out_shape=(jax.ShapeDtypeStruct(xp.shape, x.dtype),) + (stat_shape,) * n_stats,
        grid=(num_blocks,),
        in_specs=[tile] + [vector] * len(params),
        out_specs=(tile,) + (stat,) * n_stats,
        compiler_params=_compiler_params(opts, ("parallel",)),
        interpret=_interpret_arg(opts),
        name=f"{opts.norm}_norm_forward",
    )(xp, *params)
    y = outs[0][:n, :d]
    mean = None if opts.norm == "rms" else outs[1][:n]
    return y, mean, outs[-1][:n]


def backward_grid(n: int, opts: NormKernelOptions) -> tuple[int, int]:
    """(programs, row tiles per program) of the backward for N rows."""
    num_blocks = pl.cdiv(n, opts.blocks.block_rows)
    steps = pl.cdiv(num_blocks, opts.max_programs)
    return pl.cdiv(num_blocks, steps), steps


def norm_backward(
    x: jax.Array, weight: jax.Array, mean: jax.Array | None, rstd: jax.Array, dy: jax.Array, opts: NormKernelOptions
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """dx (N, D) in x's dtype, and dw, db (D,) in fp32 summed over all rows (db None for RMSNorm)."""
    n, d = x.shape
    rows = opts.blocks.block_rows
    width = padded_features(d, opts.lowering)
    programs, steps = backward_grid(n, opts)
    n_pad = programs * steps * rows
    xp, dyp = _pad(x, n_pad, width), _pad(dy, n_pad, width)
    stats = [rstd] if mean is None else [mean, rstd]
    stats = [_pad(s, n_pad, 1) for s in stats]
    wp = _row_vector(weight, width)

    if opts.lowering == TRITON:
        # One program per group of tiles; it walks them in an in-kernel loop.
        grid, block = (programs, 1), steps * rows
        index = lambda g, s: (g, 0)
    else:
        # One grid step per tile; axis 1 is sequential and accumulates into the partials.
        grid, block = (programs, steps), rows
        index = lambda g, s: (g * steps + s, 0)
    tile = pl.BlockSpec((block, width), index)
    stat = pl.BlockSpec((block, 1), index)
    vector = pl.BlockSpec((1, width), lambda g, s: (0, 0))
    partial = pl.BlockSpec((1, 1, width), lambda g, s: (g, 0, 0))
    partial_shape = jax.ShapeDtypeStruct((programs, 1, width), jnp.float32)
    n_partials = 1 if opts.norm == "rms" else 2
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, norm=opts.norm, d=d, sub_rows=rows, accumulate=opts.lowering == TPU),
        out_shape=(jax.ShapeDtypeStruct(xp.shape, x.dtype),) + (partial_shape,) * n_partials,
        grid=grid,
        in_specs=[tile, vector] + [stat] * len(stats) + [tile],
        out_specs=(tile,) + (partial,) * n_partials,
        compiler_params=_compiler_params(opts, ("parallel", "arbitrary")),
        interpret=_interpret_arg(opts),
        name=f"{opts.norm}_norm_backward",
    )(xp, wp, *stats, dyp)
    dx = outs[0][:n, :d]
    dw = jnp.sum(outs[1][:, 0, :d], axis=0)
    db = None if opts.norm == "rms" else jnp.sum(outs[2][:, 0, :d], axis=0)
    return dx, dw, db


# --- the differentiable norm ------------------------------------------------------------------------


def _fused_norm_primal(x, weight, bias, opts: NormKernelOptions) -> jax.Array:
    return norm_forward(x, weight, bias, opts)[0]


def _fused_norm_fwd(x, weight, bias, opts):
    y, mean, rstd = norm_forward(x, weight, bias, opts)
    return y, (x, weight, bias, mean, rstd)


def _fused_norm_bwd(opts, res, dy):
    x, weight, bias, mean, rstd = res
    dx, dw, db = norm_backward(x, weight, mean, rstd, dy, opts)
    if bias is None:
        return dx, dw.astype(weight.dtype), None
    assert db is not None, "LayerNorm returns the bias gradient"
    return dx, dw.astype(weight.dtype), db.astype(bias.dtype)


_fused_norm = jax.custom_vjp(_fused_norm_primal, nondiff_argnums=(3,))
_fused_norm.defvjp(_fused_norm_fwd, _fused_norm_bwd)


def pallas_run(norm: str, lowering: str):
    """A backend's ``run(x, weight, bias, *, eps, blocks, interpret)`` for x of any shape (..., D):
    rows are flattened for the kernels and the result takes x's shape again."""

    def run(x, weight, bias, *, eps: float, blocks: NormBlocks, interpret: bool = False):
        check_blocks(blocks, lowering)
        opts = NormKernelOptions(norm=norm, eps=float(eps), blocks=blocks, lowering=lowering, interpret=interpret)
        rows = x.reshape(-1, x.shape[-1])
        return _fused_norm(rows, weight, None if norm == "rms" else bias, opts).reshape(x.shape)

    return run
