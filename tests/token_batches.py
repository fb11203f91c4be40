"""Random token batches for train-step tests: the same draws wherever a test asks for them."""

from __future__ import annotations

import numpy as np


def random_batches(vocab: int, n: int = 3, batch: int = 8, seq: int = 16) -> list[dict[str, np.ndarray]]:
    """``n`` batches of ``inputs``/``targets`` (next tokens) and an all-true ``mask``, seed 0."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        t = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
        out.append({"inputs": t[:, :-1], "targets": t[:, 1:], "mask": np.ones((batch, seq), bool)})
    return out
