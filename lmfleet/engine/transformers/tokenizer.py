"""A Hugging Face tokenizer behind the `Tokenizer` protocol of lmfleet.engine.base.

Owns: loading the tokenizer of a model folder (or a GGUF file, which transformers reads with `gguf_file=`) and
rendering chat prompts with its own chat template, control tokens inside message text encoded as plain text
(transformers' `sanitize_control_tokens`). Does not own: incremental detokenizing and stop strings (the worker's
text layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmfleet.engine.base import FALLBACK_CHAT_TEMPLATE, ChatTemplateError


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

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def grammar_vocabulary(self) -> Any:
        """llguidance's view of this vocabulary (lmfleet.engine.grammar), from the fast tokenizer's own JSON."""
        from llguidance.hf import from_tokenizer

        return from_tokenizer(self._tok, eos_token=list(self._eos))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
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
                sanitize_control_tokens=True,
            )
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        return list(ids)
