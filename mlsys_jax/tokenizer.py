"""Tokenizers the recipe and the server take: UTF-8 bytes, or a Hugging Face ``tokenizer.json``
(through the ``tokenizers`` library) with the chat template of its ``tokenizer_config.json``.

Both answer the same calls: ``encode``, ``decode``, ``vocab_size`` and the ``EOS`` that joins
documents; ``render_chat`` turns a conversation into the prompt text the model was tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mlsys_jax.models.base import ConfigError


class TokenizerError(ConfigError):
    """A tokenizer that cannot be loaded or used as asked."""


class Tokenizer(Protocol):
    """What the data pipeline, sampling and the server need of a tokenizer."""

    @property
    def EOS(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str | bytes) -> np.ndarray: ...
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus padding, beginning- and end-of-document tokens."""

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259
    name = "byte"
    chat_template = None

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


#: The conversation format for a tokenizer without a template of its own (the byte tokenizer).
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A ``tokenizer.json`` and, when beside it, ``tokenizer_config.json`` (special tokens and the
    chat template; a ``chat_template.jinja`` file wins, as in transformers)."""

    def __init__(self, path: str | Path) -> None:
        import tokenizers

        path = Path(path).expanduser()
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(
                f"{path} has no tokenizer.json. Fix: point --tokenizer at a Hugging Face tokenizer.json (or its "
                "folder), or use --tokenizer byte."
            )
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the tokenizers library raises its own exception type
            raise TokenizerError(f"{file} cannot be loaded by the tokenizers library: {err}") from err
        self.name = str(folder)
        self.config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                self.config = json.loads((folder / "tokenizer_config.json").read_text())
            except (OSError, ValueError) as err:
                raise TokenizerError(f"{folder / 'tokenizer_config.json'} cannot be read as JSON: {err}") from err
        template = self.config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.special = {
            key: _token_text(self.config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        eos = self.special["eos_token"]
        self.EOS = self._id(eos) if eos is not None else -1
        self.BOS = self._id(self.special["bos_token"]) if self.special["bos_token"] else None

    def _id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise TokenizerError(f"{self.name}: special token {token!r} is not in the vocabulary")
        return found

    @property
    def dtype(self) -> type:
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def encode_prompt(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """A completion prompt's ids with the special tokens its tokenizer puts around a text (a
    Llama tokenizer's BOS), as transformers' ``tokenizer(text)`` gives them; a chat prompt gets
    its special tokens from the template instead, so it is encoded with ``encode``."""
    if isinstance(tokenizer, HFTokenizer):
        return np.asarray(tokenizer.tokenizer.encode(text, add_special_tokens=True).ids, dtype=tokenizer.dtype)
    return tokenizer.encode(text)


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """A conversation as the prompt text the tokenizer's chat template makes of it (a plain
    ``role: content`` format when it has none), rendered in a sandbox as transformers does."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    template = getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE
    special = {k: v or "" for k, v in getattr(tokenizer, "special", {}).items()}
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **special
        )
    except TemplateError as err:
        raise TokenizerError(
            f"the chat template of {getattr(tokenizer, 'name', 'the tokenizer')} refused: {err}"
        ) from err


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``"byte"`` (or None) for UTF-8 bytes; otherwise a tokenizer.json or the folder holding it."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
