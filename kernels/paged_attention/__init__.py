"""``paged_attention``: attention of new queries over a paged KV cache, with checks and dispatch.

Serving keeps each sequence's keys and values in fixed-size blocks ("pages") of one shared pool
per layer, found through a per-sequence block table, so sequences grow without reallocating. The
family's layout: ``reference`` (the specification, and the ``xla`` backend). ``PAGED_ATTENTION``
is the explicit table of backends and each platform's order of preference; Pallas backends join
it as modules beside the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax.kernels.attention.checks import check_heads, check_window, per_row
from mlsys_jax.kernels.dispatch import Choice, Registry
from mlsys_jax.kernels.paged_attention import reference, triton
from mlsys_jax.kernels.paged_attention.reference import gather_pages, paged_attention_reference

__all__ = [
    "PAGED_ATTENTION",
    "choose",
    "gather_pages",
    "paged_attention",
    "paged_attention_reference",
]

PAGED_ATTENTION = Registry(
    "paged_attention",
    order={"gpu": ("pallas_triton", "xla"), "tpu": ("xla",), "cpu": ("xla",)},
    backends=(reference.BACKEND, triton.BACKEND),
)

_WHERE = "paged_attention"


def _check_inputs(q, k_pages, v_pages, block_tables, sliding_window) -> None:
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
    k_pages: jax.Array | jax.ShapeDtypeStruct,
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
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
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
    return choice(
        q,
        k_pages,
        v_pages,
        block_tables.astype(jnp.int32),
        lengths,
        q_offset,
        sm_scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
        window=sliding_window,
    )
