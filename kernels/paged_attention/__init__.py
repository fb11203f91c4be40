"""``paged_attention``: attention of new queries over a paged KV cache, with checks and dispatch.

Serving keeps each sequence's keys and values in fixed-size blocks ("pages") of one shared pool
per layer, found through a per-sequence block table, so sequences grow without reallocating. The
family's layout: ``reference`` (the specification, and the ``xla`` backend: gather a row's pages,
then attend), ``triton`` and ``tpu`` (Pallas kernels that walk the block table and read each
block straight from the pool), ``pages`` (the pools' formats: plain, or int8 with one scale per
block and K/V head). ``PAGED_ATTENTION`` is the explicit table of backends and each platform's
order of preference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention.checks import check_heads, check_window, per_row
from mlsys_jax.kernels.dispatch import Choice, Registry
from mlsys_jax.kernels.paged_attention import reference, tpu, triton
from mlsys_jax.kernels.paged_attention.pages import Int8Pages, is_int8_pages, quantize_blocks
from mlsys_jax.kernels.paged_attention.reference import gather_pages, paged_attention_reference

__all__ = [
    "PAGED_ATTENTION",
    "Int8Pages",
    "choose",
    "gather_pages",
    "paged_attention",
    "paged_attention_reference",
    "quantize_blocks",
]

PAGED_ATTENTION = Registry(
    "paged_attention",
    order={"gpu": ("pallas_triton", "xla"), "tpu": ("pallas_tpu", "xla"), "cpu": ("xla",)},
    backends=(reference.BACKEND, triton.BACKEND, tpu.BACKEND),
)

_WHERE = "paged_attention"


def _check_scales(q, pages: Int8Pages, name: str) -> None:
    if pages.values.dtype != jnp.int8:
        raise ValueError(f"{_WHERE}: {name} of Int8Pages must hold int8 values, got {pages.values.dtype}")
    want = (pages.values.shape[0], pages.values.shape[2])
    if pages.scale.shape != want:
        raise ValueError(
            f"{_WHERE}: {name}.scale must be (num_blocks, kv_heads) = {want}, one scale per block and "
            f"K/V head; got shape {pages.scale.shape}"
        )


def _check_inputs(q, k_pages, v_pages, block_tables, sliding_window) -> None:
    if is_int8_pages(k_pages) != is_int8_pages(v_pages):
        raise ValueError(f"{_WHERE}: k_pages and v_pages must both be Int8Pages or both plain arrays")
    if is_int8_pages(k_pages):
        _check_scales(q, k_pages, "k_pages")
        _check_scales(q, v_pages, "v_pages")
        k_pages = jax.ShapeDtypeStruct(k_pages.values.shape, q.dtype)
        v_pages = jax.ShapeDtypeStruct(v_pages.values.shape, q.dtype)
    if q.ndim != 4:
        raise ValueError(f"{_WHERE}: q must be (batch, q_len, heads, head_dim), got shape {q.shape}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.ndim != 4:
            raise ValueError(
                f"{_WHERE}: {name} must be (num_blocks, block_size, kv_heads, head_dim), got shape {x.shape}"
            )
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"{_WHERE}: k_pages {k_pages.shape} and v_pages {v_pages.shape} must have the same shape")
    check_heads(_WHERE, q, k_pages, v_pages, ("q", "k_pages", "v_pages"))
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(
            f"{_WHERE}: block_tables must be (batch, max_blocks) = ({q.shape[0]}, max_blocks), one row of "
            f"physical block ids per sequence; got shape {block_tables.shape}"
        )
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"{_WHERE}: block_tables must hold integer block ids, got {block_tables.dtype}")
    check_window(_WHERE, sliding_window)


def choose(
    q: jax.Array | jax.ShapeDtypeStruct,
    k_pages: jax.Array | jax.ShapeDtypeStruct | Int8Pages,
    *,
    sliding_window: int | None = None,
    implementation: str | None = None,
) -> Choice:
    """The backend ``paged_attention`` would run for these arguments (see ``Choice.describe``)."""
    return PAGED_ATTENTION.choose(
        implementation,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        q_len=q.shape[1],
        heads=q.shape[2],
        kv_heads=k_pages.shape[2],
        block_size=k_pages.shape[1],
        window=sliding_window,
        pages_dtype=k_pages.dtype,
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array | Int8Pages,
    v_pages: jax.Array | Int8Pages,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    q_offset: jax.Array | int | None = None,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Causal attention of q over each row's keys and values kept in pages of a shared pool.

    q: (batch, q_len, heads, head_dim), q_len 1 for a decode step or more for a prefill chunk.
    k_pages, v_pages: (num_blocks, block_size, kv_heads, head_dim), one layer's pool; kv_heads
    divides heads and query head h reads K/V head h // (heads // kv_heads). block_tables:
    (batch, max_blocks) ints, row b's logical block j is physical block block_tables[b, j]
    (entries past a row's used blocks may hold anything). lengths: (batch,) ints, how many keys
    row b has, including this step's; later positions are hidden. q_offset: (batch,) ints (or
    one int), the position of each row's first query, by default lengths - q_len. Query i of row
    b sees keys at positions <= q_offset[b] + i, and with ``sliding_window=w`` only those
    > q_offset[b] + i - w. A query that sees no key gets zeros. ``implementation``: None picks
    the best backend here, or a backend's name ("xla").
    """
    _check_inputs(q, k_pages, v_pages, block_tables, sliding_window)
    batch, q_len = q.shape[:2]
    lengths = per_row(_WHERE, "lengths", lengths, batch)
    q_offset = lengths - q_len if q_offset is None else per_row(_WHERE, "q_offset", q_offset, batch)
    choice = choose(q, k_pages, sliding_window=sliding_window, implementation=implementation)
    scales = {}
    if isinstance(k_pages, Int8Pages) and isinstance(v_pages, Int8Pages):
        scales = {"k_scales": k_pages.scale, "v_scales": v_pages.scale}
        k_pages, v_pages = k_pages.values, v_pages.values
    return choice(
        q,
        k_pages,
        v_pages,
        block_tables.astype(jnp.int32),
        lengths,
        q_offset,
        sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
        window=sliding_window,
        **scales,
    )
