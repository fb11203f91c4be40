"""What the two Pallas lowerings of the fused linear cross-entropy share: tile sizes, padding and
the per-tile math.

``*_stats(h, w, labels)`` returns each token's log-sum-exp over this vocabulary shard and its
label's logit (0 when the label is not in the shard); ``*_grads(h, w, labels, lse, coef, g_label)``
returns (dh, dw) for dlogits = softmax(logits) * coef - onehot(label) * g_label, recomputing each
(tokens x vocab) tile of logits from h and w so that no whole logits array ever exists. Inputs
are padded to whole blocks (tokens with label -1 and zero weight in the backward, vocabulary
columns masked to -inf); a padding copy happens only for ragged shapes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

#: Smallest tiles: Triton's dot wants every dim >= 16; TPU wants vocab (lanes) in 128s.
MIN_BLOCK_TOKENS = 16
MIN_BLOCK_VOCAB = {"triton": 16, "tpu": 128}
#: Feature chunk of the Triton kernels (a power of two; D is padded to a multiple of it).
MAX_BLOCK_D = 64
NEG_INF = float("-inf")


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tile(requested: int, size: int, minimum: int) -> int:
    """The block actually used: the requested one, shrunk for small problems, never below min."""
    return max(minimum, min(requested, pow2_at_least(size)))


def triton_block_d(d: int) -> int:
    """Feature chunk of the Triton kernels for hidden size ``d``."""
    return max(16, min(MAX_BLOCK_D, pow2_at_least(d)))


def pad_to(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# --- tile math shared by every kernel -----------------------------------------------------------


def mask_columns(logits: jax.Array, col0: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """Column ids of a (tokens, vocab) tile starting at ``col0``, and the tile with padded
    columns (id >= vocab) set to -inf."""
    cols = col0 + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return cols, jnp.where(cols < vocab, logits, NEG_INF)


def dlogits(logits, cols, labels, lse, coef, g_label):
    """softmax(logits) * coef - onehot(label) * g_label on one tile (padded columns give 0)."""
    p = jnp.exp(logits - lse[:, None])
    return p * coef[:, None] - jnp.where(cols == labels[:, None], g_label[:, None], 0.0)


def dot(a, b, contract: tuple[int, int]) -> jax.Array:
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)
