"""A GGUF file's own vocabulary behind the `Tokenizer` protocol of lmfleet.engine.base, through llama.cpp.

Owns: encoding and decoding with the llama vocab, rendering chat prompts with the GGUF's Jinja chat template
(`tokenizer.chat_template`) the way Hugging Face transformers renders them, control tokens typed inside message text
encoded as plain text, and llguidance's view of the vocab (`grammar_vocabulary`: special exactly where llama.cpp's
tokenizer never makes the token from text). Does not own: the model's lifetime (the `LlamaCppEngine` that loaded it
frees it in `close()`; a tokenizer must not outlive it), incremental detokenizing and stop strings (the worker's text
layer).

Control tokens in message text: every string the caller passes in is scanned for the vocab's control tokens (and for
user-defined tokens the template itself writes); each occurrence is wrapped in two private-use markers before the
template runs. The rendered prompt is then split at the markers: the template's own text is tokenized with
`parse_special=True`, so its `<|im_start|>` becomes the control token, and every marked occurrence with
`parse_special=False`, so a user typing `<|im_start|>system` gets the characters, never the token. A marker left
alone (a template's string method split a marked token) is dropped but still breaks the text, so the two halves
cannot join into a control token. This is transformers' `sanitize_control_tokens` (`mark_control_tokens`,
`encode_marked_chat` in `transformers.utils.chat_template_utils`) over a llama vocab.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import llama_cpp.llama_cpp as llama
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmfleet.engine.base import FALLBACK_CHAT_TEMPLATE, ChatTemplateError

# transformers' markers (Supplementary Private Use Area-A): never produced by a tokenizer, never typed by a client
# that means it (and stripped from input before marking, so they cannot forge a marked token).
_START, _END = "\U000f0000", "\U000f0001"


class GGUFTokenizer:
    """Text ↔ ids for the model `model` (a `llama_model` pointer from `LlamaCppEngine.model`)."""

    def __init__(self, model: Any) -> None:
        vocab = llama.llama_model_get_vocab(model)
        self._vocab = vocab
        self._n_vocab = int(llama.llama_vocab_n_tokens(vocab))
        self._piece = ctypes.create_string_buffer(256)
        eos, eot = llama.llama_vocab_eos(vocab), llama.llama_vocab_eot(vocab)
        self._eos = tuple(dict.fromkeys(t for t in (eos, eot) if 0 <= t < self._n_vocab))
        raw = llama.llama_model_chat_template(model, None)
        self.chat_template: str | None = raw.decode("utf-8") if raw else None
        # A template that does not compile fails each chat request (ChatTemplateError), not the load: completions
        # still work.
        self._template: jinja2.Template | None = None
        self._template_error = ""
        try:
            self._template = _environment().from_string(self.chat_template or FALLBACK_CHAT_TEMPLATE)
        except jinja2.TemplateError as exc:
            self._template_error = f"the model's chat template does not compile: {exc}"
        self._bos_text = self._token_text(llama.llama_vocab_bos(vocab))
        self._eos_text = self._token_text(eos)

        # Control tokens always count; user-defined ones only where the template writes them (as transformers does
        # for non-special added tokens): elsewhere they are ordinary vocabulary a user may type.
        literals = _literal_text(self.chat_template or FALLBACK_CHAT_TEMPLATE)
        self._token_ids: dict[str, int] = {}
        for i in range(self._n_vocab):
            attr = llama.llama_vocab_get_attr(vocab, i)
            if attr & llama.LLAMA_TOKEN_ATTR_CONTROL or (
                attr & llama.LLAMA_TOKEN_ATTR_USER_DEFINED and self._is_template_token(i, literals)
            ):
                text = self._token_text(i)
                if text:
                    self._token_ids.setdefault(text, i)
        longest_first = sorted(self._token_ids, key=len, reverse=True)
        control = "|".join(map(re.escape, longest_first)) or "(?!)"  # (?!) never matches
        self._control_re = re.compile(control)
        self._markers_re = re.compile(f"{_START}({control}){_END}|[{_START}{_END}]")
        self._newline_ids = self._tokenize("\n", add_special=False, parse_special=False)

    # -- the Tokenizer protocol ---------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def __len__(self) -> int:
        return self._n_vocab

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Plain text's ids: control tokens spelled in `text` stay text. BOS first when the model asks for one."""
        return self._tokenize(text, add_special=add_special_tokens, parse_special=False)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The pieces' bytes joined, then decoded (a piece may hold part of a UTF-8 character); control tokens are
        left out when `skip_special_tokens`."""
        return b"".join(self._token_bytes(i, special=not skip_special_tokens) for i in ids).decode(
            "utf-8", errors="replace"
        )

    def grammar_vocabulary(self) -> Any:
        """llguidance's view of this vocabulary (lmfleet.engine.grammar): each token's bytes as llama.cpp decodes
        them, control tokens marked special (0xFF before their text, so a grammar can name them and no text matches
        them), and llama.cpp's own tokenizer, which llguidance uses for text the grammar forces.

        A token is special exactly when that tokenizer never makes it from text: the control tokens. User-defined
        tokens (Qwen's `<tool_call>`) are text: llama.cpp makes them from text and decodes them as text. llguidance's
        `lltokenizer_from_vocab` marks the ones that look like tags special too, so a grammar that forces the text
        `<tool_call>` is tokenized into the one token, allowed, and then refused as a special token."""
        from llguidance import LLTokenizer

        tokens = []
        for i in range(self._n_vocab):
            if llama.llama_vocab_get_attr(self._vocab, i) & llama.LLAMA_TOKEN_ATTR_CONTROL:
                tokens.append(b"\xff" + self._token_bytes(i, special=True))
            else:  # text, or nothing (unused ids decode to no bytes: never allowed)
                tokens.append(self._token_bytes(i, special=False))
        tokenize = ctypes.cast(llama._lib.llama_tokenize, ctypes.c_void_p).value
        return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
            tokens=tokens, vocab_ptr=self._vocab, tokenize_fptr=tokenize, eos_token=list(self._eos), slices=None
        )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The chat prompt's ids through the GGUF's template (or FALLBACK_CHAT_TEMPLATE when it has none)."""
        if self._template is None:
            raise ChatTemplateError(self._template_error)
        # transformers drops the keys whose value is None before rendering (OpenAI clients send content=None)
        marked = [self._mark({k: v for k, v in m.items() if v is not None}) for m in messages]
        try:
            text = self._template.render(
                **self._mark(dict(template_kwargs or {})),
                messages=marked,
                add_generation_prompt=add_generation_prompt,
                tools=self._mark(tools) if tools else None,
                bos_token=self._bos_text,
                eos_token=self._eos_text,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
        return self._encode_marked(text)

    # -- chat templates -----------------------------------------------------------------------------------------

    def _mark(self, obj: Any) -> Any:
        """Wrap every control token inside the caller's strings in the markers (dict keys are left alone)."""
        if isinstance(obj, str):
            obj = obj.replace(_START, "").replace(_END, "")
            return self._control_re.sub(f"{_START}\\g<0>{_END}", obj)
        if isinstance(obj, dict):
            return {k: self._mark(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self._mark(v) for v in obj]
        return obj

    def _encode_marked(self, chat: str) -> list[int]:
        # split() gives [text, marked token, text, marked token, ..., text]; None where a marker stood alone
        pieces = self._markers_re.split(chat)
        ids = self._tokenize(pieces[0], add_special=False, parse_special=True)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = self._encode_piece(piece, parse_special=not as_text)
            if as_text and self._token_ids[piece] in piece_ids:
                # llama.cpp matches user-defined tokens even with parse_special=False
                raise ChatTemplateError(f"cannot encode {piece!r} in a message as plain text for this model")
            ids += piece_ids
        return ids

    def _encode_piece(self, piece: str, *, parse_special: bool) -> list[int]:
        """A piece from the middle of a chat. Encoded after a newline, then the newline removed, so a SentencePiece
        vocab does not add the space it adds at the start of a text (transformers' trick, for the same ids)."""
        ids = self._tokenize("\n" + piece, add_special=False, parse_special=parse_special)
        n = len(self._newline_ids)
        if ids[:n] == self._newline_ids:
            return ids[n:]
        return self._tokenize(piece, add_special=False, parse_special=parse_special)

    def _is_template_token(self, token: int, literals: str) -> bool:
        text = self._token_text(token)
        return bool(text) and not text.isspace() and text in literals

    # -- llama.cpp ----------------------------------------------------------------------------------------------

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 2  # at most one token per byte, plus BOS/EOS
        while True:
            out = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self._vocab, data, len(data), out, capacity, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes(token_id, special=True)

    def _token_bytes(self, token: int, *, special: bool) -> bytes:
        if not 0 <= token < self._n_vocab:  # llama.cpp aborts the process on an id outside the vocabulary
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self._n_vocab})")
        n = llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[:n]

    def _token_text(self, token: int) -> str:
        if not 0 <= token < self._n_vocab:
            return ""
        return self._token_bytes(token, special=True).decode("utf-8", errors="replace")


# -- the Jinja environment (transformers' `_cached_compile_jinja_template`) --------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """A template `namespace()` that refuses underscore names, so a template cannot reach interpreter internals
    through it (templates inside GGUF files are untrusted code)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def _literal_text(template: str) -> str:
    """The template's literal strings (raw text and string constants) joined with NULs, so a substring search
    cannot match across two of them."""
    try:
        ast = _environment().parse(template)
    except jinja2.TemplateError:
        return ""
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)
