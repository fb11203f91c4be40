"""All-reduce algorithms built from point-to-point sends, for use inside ``jax.shard_map``.

Each function runs on one device's block and names a mesh axis; it moves data only with
``lax.ppermute`` (no psum, all-gather, reduce-scatter or all-to-all), so the compiled program
shows each algorithm's own message pattern and step count. Any axis size works (size 1 is the
identity), as does any shape: the array is flattened, zero-padded to whole chunks, and
reshaped back, keeping its dtype. Every Python loop is unrolled over the static axis size, so
each step is one collective-permute in the HLO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

UpdateFn = Callable[[jax.Array, jax.Array], jax.Array]


# ---- layout helpers ------------------------------------------------------------------------


def _chunks(x: jax.Array, parts: int) -> jax.Array:
    """``x`` flattened and zero-padded to ``parts`` equal rows: shape (parts, ceil(size/parts))."""
    flat = x.reshape(-1)
    width = max(1, -(-flat.size // parts))
    return jnp.pad(flat, (0, parts * width - flat.size)).reshape(parts, width)


def _unchunk(chunks: jax.Array, like: jax.Array) -> jax.Array:
    """Undo ``_chunks``: drop the padding and take ``like``'s shape."""
    return chunks.reshape(-1)[: like.size].reshape(like.shape)


def _row(chunks: jax.Array, index: jax.Array) -> jax.Array:
    """Row ``index`` (traced) of a (rows, width) array."""
    return lax.dynamic_index_in_dim(chunks, index, keepdims=False)


def _shift(x: jax.Array, axis_name: str, n: int, by: int = 1) -> jax.Array:
    """Send ``x`` from device i to device (i + by) mod n along ``axis_name``."""
    return lax.ppermute(x, axis_name, [(i, (i + by) % n) for i in range(n)])


@dataclasses.dataclass(frozen=True)
class _Rings:
    """Equal-sized rings of devices on one mesh axis, all stepping at once: ``members[g]`` are
    ring g's devices (positions on ``axis``) in ring order."""

    axis: str
    members: tuple[tuple[int, ...], ...]

    @classmethod
    def whole(cls, axis: str) -> _Rings:
        """One ring of every device on the axis, in axis order."""
        return cls(axis, (tuple(range(lax.axis_size(axis))),))

    @classmethod
    def grouped(cls, axis: str, group: int, across: bool) -> _Rings:
        """The axis seen as consecutive groups of ``group`` devices: a ring within each group, or
        (``across``) a ring through the same position of every group."""
        n = lax.axis_size(axis)
        groups = n // group
        if across:
            return cls(axis, tuple(tuple(g * group + r for g in range(groups)) for r in range(group)))
        return cls(axis, tuple(tuple(g * group + r for r in range(group)) for g in range(groups)))

    @property
    def size(self) -> int:
        return len(self.members[0])

    def rank(self) -> jax.Array:
        """This device's position in its ring."""
        table = [0] * sum(len(m) for m in self.members)
        for ring in self.members:
            for r, device in enumerate(ring):
                table[device] = r
        return jnp.asarray(table, jnp.int32)[lax.axis_index(self.axis)]

    def send(self, x: jax.Array, by: int = 1) -> jax.Array:
        """Every device sends ``x`` ``by`` places ahead in its ring: one collective-permute."""
        k = self.size
        pairs = [(ring[r], ring[(r + by) % k]) for ring in self.members for r in range(k)]
        return lax.ppermute(x, self.axis, pairs)


# ---- ring ----------------------------------------------------------------------------------


def _ring_reduce_scatter(chunks: jax.Array, rings: _Rings) -> jax.Array:
    """Sum of row r of ``chunks`` over each ring, on the ring's device r: n-1 sends to the next
    device, each forwarding the running partial sum of one row."""
    n, i = rings.size, rings.rank()
    partial = _row(chunks, (i - 1) % n)
    for step in range(n - 1):
        partial = rings.send(partial) + _row(chunks, (i - 2 - step) % n)
    return partial


def _ring_all_gather(own: jax.Array, rings: _Rings) -> jax.Array:
    """Every ring member's ``own`` row stacked in ring order: n-1 sends to the next device, each
    forwarding the row received in the step before."""
    n, i = rings.size, rings.rank()
    rows = jnp.zeros((n, *own.shape), own.dtype)
    rows = lax.dynamic_update_index_in_dim(rows, own, i, 0)
    moving = own
    for step in range(n - 1):
        moving = rings.send(moving)
        rows = lax.dynamic_update_index_in_dim(rows, moving, (i - 1 - step) % n, 0)
    return rows


def _ring_sum(x: jax.Array, rings: _Rings, buckets: int = 1) -> jax.Array:
    """Reduce-scatter then all-gather around ``rings``, per bucket."""
    n = rings.size
    if n == 1 or x.size == 0:
        return x
    pieces = _chunks(x, buckets)
    summed = [
        _ring_all_gather(_ring_reduce_scatter(_chunks(piece, n), rings), rings).reshape(-1)[: piece.size]
        for piece in pieces
    ]
    return _unchunk(jnp.stack(summed), x)


def ring_all_reduce(x: jax.Array, axis_name: str, *, buckets: int = 1) -> jax.Array:
    """Sum ``x`` over ``axis_name`` around a ring: reduce-scatter then all-gather of n chunks.

    In the reduce-scatter each device passes a running partial sum to its right neighbour n-1
    times, ending with one fully summed chunk; the all-gather passes the summed chunks around
    n-1 more times. With ``buckets`` > 1 the array is cut into that many pieces, each with its
    own ring, so 2(n-1) permutes per bucket (smaller messages that a scheduler may overlap).
    """
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    return _ring_sum(x, _Rings.whole(axis_name), buckets)


# ---- recursive halving and doubling --------------------------------------------------------


def _butterfly(chunks: jax.Array, axis_name: str, rank: jax.Array, device_of: list[int]) -> jax.Array:
    """All-reduce of (p, width) ``chunks`` among the p = len(device_of) ranks (p a power of two);
    rank r is device ``device_of[r]`` on the axis, and swaps with rank r XOR distance."""
    p = len(device_of)
    distances = [1 << k for k in range(p.bit_length() - 1)]  # 1, 2, ..., p/2

    def swap(x: jax.Array, distance: int) -> jax.Array:
        return lax.ppermute(x, axis_name, [(device_of[r], device_of[r ^ distance]) for r in range(p)])

    def upper(distance: int) -> jax.Array:
        return (rank // distance) % 2 == 1  # this rank is the upper partner at that distance

    segment = chunks
    for d in reversed(distances):  # halving: keep one half, send the other, sum
        lo, hi = jnp.split(segment, 2)
        segment = jnp.where(upper(d), hi, lo) + swap(jnp.where(upper(d), lo, hi), d)
    for d in distances:  # doubling: swap whole segments, join in rank order
        other = swap(segment, d)
        segment = jnp.where(upper(d), jnp.concatenate([other, segment]), jnp.concatenate([segment, other]))
    return segment


def halving_doubling_all_reduce(x: jax.Array, axis_name: str) -> jax.Array:
    """Sum ``x`` over ``axis_name`` by recursive halving, then recursive doubling.

    Halving: at partner distance p/2, p/4, ..., 1 each device swaps half of its current segment
    with its partner and sums the half it keeps, ending with 1/p of the sum; doubling retraces
    the distances in reverse, swapping whole segments, so each step doubles what a device holds.
    For n not a power of two (p = 2^floor(log2 n), r = n - p), odd devices among the first 2r
    first send their block to the even device below them, and get the result back at the end.
    """
    n = lax.axis_size(axis_name)
    if n == 1 or x.size == 0:
        return x
    p = 1 << (n.bit_length() - 1)
    r = n - p
    i = lax.axis_index(axis_name)
    if r:
        folded = lax.ppermute(x, axis_name, [(2 * j + 1, 2 * j) for j in range(r)])
        x_in = x + folded  # devices that receive nothing get zeros
    else:
        x_in = x
    rank = jnp.where(i < 2 * r, i // 2, i - r)
    device_of = [2 * j if j < r else j + r for j in range(p)]
    total = _unchunk(_butterfly(_chunks(x_in, p), axis_name, rank, device_of), x)
    if r:
        returned = lax.ppermute(total, axis_name, [(2 * j, 2 * j + 1) for j in range(r)])
        total = jnp.where((i < 2 * r) & (i % 2 == 1), returned, total)
    return total


# ---- hierarchical --------------------------------------------------------------------------


def _two_level(x: jax.Array, inner: _Rings, outer: _Rings) -> jax.Array:
    """Inner reduce-scatter, outer all-reduce of each 1/inner shard, inner all-gather."""
    if x.size == 0:
        return x
    if inner.size == 1:
        return _ring_sum(x, outer)
    own = _ring_reduce_scatter(_chunks(x, inner.size), inner)
    own = _ring_sum(own, outer)
    return _unchunk(_ring_all_gather(own, inner), x)


def hierarchical_all_reduce(x: jax.Array, inner_axis: str, outer_axis: str) -> jax.Array:
    """Sum ``x`` over two mesh axes: a ring reduce-scatter within ``inner_axis``, a ring
    all-reduce of each 1/inner shard across ``outer_axis``, then a ring all-gather within
    ``inner_axis``; the slow outer links carry only 1/inner of the data."""
    return _two_level(x, _Rings.whole(inner_axis), _Rings.whole(outer_axis))


def sliced_all_reduce(x: jax.Array, axis_name: str, slice_size: int) -> jax.Array:
    """The hierarchical all-reduce over one mesh axis whose devices come in slices of
    ``slice_size`` consecutive devices (a data axis spanning several pods or hosts): a ring within
    each slice, a ring across slices through the devices at the same place in each, then a ring
    within each slice again. 2(slice_size - 1) + 2(slices - 1) permutes."""
    n = lax.axis_size(axis_name)
    if slice_size < 1 or n % slice_size:
        raise ValueError(f"slice_size {slice_size} must divide the {axis_name!r} axis size {n}")
    inner = _Rings.grouped(axis_name, slice_size, across=False)
    outer = _Rings.grouped(axis_name, slice_size, across=True)
    return _two_level(x, inner, outer)


# ---- parameter server ----------------------------------------------------------------------


def parameter_server_step(grads: jax.Array, params: jax.Array, update_fn: UpdateFn, axis_name: str) -> jax.Array:
    """One synchronous parameter-server update; returns the new full parameters on every device.

    The flattened parameters are owned in n shards, shard i by device i. Push: for shift
    s = 1..n-1 every device sends its gradient shard (i+s) mod n straight to that shard's owner.
    Each owner sums the n gradients of its shard and applies ``update_fn(param_shard,
    grad_sum_shard)`` to it alone. Pull: for s = 1..n-1 every owner sends its new shard to
    device (i+s) mod n. Equal to ``update_fn(params, psum(grads))`` everywhere, provided
    ``update_fn`` is elementwise (it sees a flat, zero-padded 1/n slice).

    Bytes: each device sends (n-1)/n * V in the push and (n-1)/n * V in the pull, 2(n-1)/n * V
    in 2(n-1) steps, the same as the ring all-reduce; but its messages go to every other device,
    not just a neighbour, and a single dedicated server instead would take in (n-1) * V.
    """
    if grads.shape != params.shape:
        raise ValueError(f"grads {grads.shape} and params {params.shape} must have the same shape")
    n = lax.axis_size(axis_name)
    if n == 1 or params.size == 0:
        return update_fn(params, grads)
    i = lax.axis_index(axis_name)
    grad_rows = _chunks(grads, n)
    grad_sum = _row(grad_rows, i)
    for s in range(1, n):
        grad_sum = grad_sum + _shift(_row(grad_rows, (i + s) % n), axis_name, n, s)
    own = update_fn(_row(_chunks(params, n), i), grad_sum)
    rows = lax.dynamic_update_index_in_dim(jnp.zeros((n, *own.shape), own.dtype), own, i, 0)
    for s in range(1, n):
        rows = lax.dynamic_update_index_in_dim(rows, _shift(own, axis_name, n, s), (i - s) % n, 0)
    return _unchunk(rows, params)
