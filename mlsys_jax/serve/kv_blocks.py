"""The paged KV cache's bookkeeping on the host: a free list of fixed-size blocks.

Block 0 is never handed out: padding tokens write there and empty table entries point there,
so a real sequence never reads or overwrites another's keys.
"""

from __future__ import annotations

TRASH = 0


class BlockAllocator:
    """Hands out and takes back cache blocks; all or nothing per request."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack: the lowest ids go first

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out (all but the reserved one)."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        out = [self._free.pop() for _ in range(n)]
        return out

    def release(self, blocks: list[int]) -> None:
        """Give blocks back; giving back one twice, or the reserved one, is a bug."""
        held = set(self._free)
        for b in blocks:
            if b == TRASH or b in held or not 0 < b < self.num_blocks:
                raise ValueError(f"block {b} is not in use")
            held.add(b)
        self._free.extend(reversed(blocks))
