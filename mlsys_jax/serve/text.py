"""Text out of tokens as they come: whole UTF-8 characters only, and nothing past a stop string.

A byte-level tokenizer can split one character across tokens, and a stop string can arrive in
pieces; the stream holds back an incomplete last character and any tail that could still become
a stop string, so streamed text always equals the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlsys_jax.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one request's generated tokens, handed out in safe pieces."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = ""

    def _take(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""  # the decoding of a longer sequence revised earlier text: wait until it settles
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token: (the text now safe to hand out, whether a stop string was reached).
        On a stop the text ends just before it."""
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = full.find(s)
            if at >= 0:
                return self._take(full[:at]), True
        safe = full[:-1] if full.endswith(REPLACEMENT) else full
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._take(safe[: len(safe) - hold]), False

    def finish(self) -> str:
        """The rest of the text once no more tokens come."""
        full = self.tokenizer.decode(self.ids)
        return self._take(full) if full.startswith(self.emitted) else ""
