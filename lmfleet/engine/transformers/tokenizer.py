"""A Hugging Face tokenizer behind the `Tokenizer` protocol of lmfleet.engine.base.

Owns: loading the tokenizer of a model folder (or a GGUF file, which transformers reads with `gguf_file=`) and
rendering chat prompts with its own chat template, control tokens inside message text encoded as plain text
(transformers' `sanitize_control_tokens`), and joining two texts as a cross-encoder reads them. Does not own:
incremental detokenizing and stop strings (the worker's text layer).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from lmfleet.engine.base import FALLBACK_CHAT_TEMPLATE, ChatTemplateError, TokenPair


class HFTokenizer:
    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        own = tokenizer.eos_token_id
        self._eos = tuple(dict.fromkeys([*eos_token_ids, *([own] if own is not None else [])]))

    @classmethod
    def load(cls, path: str, *, gguf_file: str | None = None, eos_token_ids: Sequence[int] = ()) -> HFTokenizer:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return cls(AutoTokenizer.from_pretrained(path, **kwargs), eos_token_ids)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def chat_template(self) -> str | None:
        return getattr(self._tok, "chat_template", None)

    def __len__(self) -> int:
        return len(self._tok)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_pair(self, first: str, second: str) -> TokenPair:
        """Two texts joined as the model's tokenizer joins a pair (a cross-encoder's input), never truncated."""
        enc = self._tok(first, second, add_special_tokens=True, truncation=False, verbose=False)
        ids = list(enc["input_ids"])
        return TokenPair(ids, list(enc.get("token_type_ids") or [0] * len(ids)))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def grammar_vocabulary(self) -> Any:
        """llguidance's view of this vocabulary (lmfleet.engine.grammar), from the fast tokenizer's own JSON."""
        from llguidance.hf import from_tokenizer

        return from_tokenizer(self._tok, eos_token=list(self._eos))

    def token_bytes(self, token_id: int) -> bytes:
        """Byte-level BPE pieces map back to bytes (GPT-2's table), SentencePiece byte pieces (`<0xE2>`) to their
        byte; any other piece is its own text."""
        piece = self._tok.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes.fromhex(piece[3:5])
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    @functools.cached_property
    def _byte_level(self) -> bool:
        decoder = getattr(getattr(self._tok, "backend_tokenizer", None), "decoder", None)
        return "ByteLevel" in repr(decoder)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        from jinja2 import TemplateError

        template = None if self.chat_template else FALLBACK_CHAT_TEMPLATE
        try:
            ids = self._tok.apply_chat_template(
                messages,
                chat_template=template,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                sanitize_control_tokens=True,  # also in the template kwargs' strings
                **(template_kwargs or {}),
            )
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        return list(ids)


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _gpt2_byte_chars()
