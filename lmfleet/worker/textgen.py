"""The only place where text meets tokens: prompts in, text deltas out.

Owns: asking the tokenizer (lmfleet.engine.base.Tokenizer, from the engine's loader) for chat and completion
prompts, incremental detokenization (no broken UTF-8, never resending text already sent) and stop strings
(matched across chunk boundaries, cut from the output), and spelling the engine's log probabilities as token texts
and bytes (`LogprobSpeller`). Does not own: the chat template itself (the tokenizer
renders its own), sampling, batching (the engine) or HTTP (worker/app.py). Tests drive it with a byte tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmfleet.engine.base import ChatTemplateError, Tokenizer, TokenLogprob
from lmfleet.errors import InvalidRequest
from lmfleet.protocol.worker import LogprobAlternative
from lmfleet.protocol.worker import TokenLogprob as WireLogprob

# Tokens before the first new one that are decoded again each step, so that tokenizers which change a token's
# text by its left neighbour (SentencePiece's leading space, byte-level pieces) produce the right delta.
_CONTEXT_TOKENS = 6


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of a chat prompt through the model's chat template (`tools` for templates that take them,
    `template_kwargs` as more variables); InvalidRequest when the template refuses the messages (the client's
    mistake, not the worker's)."""
    try:
        return tokenizer.render_chat(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, template_kwargs=template_kwargs
        )
    except ChatTemplateError as exc:
        raise InvalidRequest(
            f"the model's chat template cannot render these messages: {exc}", param="messages"
        ) from exc


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A completions prompt, tokenized as the model expects a document to start (BOS where the model uses one)."""
    return tokenizer.encode(text, add_special_tokens=True)


class IncrementalDetokenizer:
    """Turns token ids into text deltas as they arrive.

    Decodes a short window (a few tokens of context + the unread ones) rather than the whole sequence, and
    holds back a delta that ends in U+FFFD: the last token is half of a multi-byte character, and the next one
    completes it. `flush()` releases whatever is still held when the sequence ends.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int] = (), *, special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = not special  # special: control tokens' text is kept (tool-call markers)
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # ids before this are already in the output

    def push(self, new_ids: Sequence[int]) -> str:
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        seen = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip_special)
        full = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip_special)
        if not final and (len(full) <= len(seen) or full.endswith("\ufffd")):
            return ""
        delta = full[len(seen) :]
        # Keep a small window: the last few ids give the context the next decode needs.
        self._prefix = max(self._read, len(self._ids) - _CONTEXT_TOKENS)
        self._read = len(self._ids)
        if self._prefix > 4 * _CONTEXT_TOKENS:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta


class StopStrings:
    """Finds the first stop string in a stream of text deltas, across delta boundaries.

    `push` returns the text that is safe to send now and whether a stop string was found (the stop string and
    everything after it are cut). Text that could be the start of a stop string is held until it is decided.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self.found: str | None = None  # the stop string that ended the text (the first in it)

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._pending += text
        hits = [(i, s) for i, s in ((self._pending.find(s), s) for s in self._stops) if i >= 0]
        if hits:
            at, self.found = min(hits, key=lambda hit: hit[0])
            out = self._pending[:at]
            self._pending = ""
            return out, True
        hold = self._held_suffix()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def _held_suffix(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        tail = self._pending[-(self._longest - 1) :] if self._longest > 1 else ""
        for n in range(len(tail), 0, -1):
            piece = tail[-n:]
            if any(s.startswith(piece) for s in self._stops):
                return n
        return 0


class TextStream:
    """Per request: generated ids in, text deltas out, with stop strings applied.

    A generation resumed from another replica (`resume`) first replays the ids generated there, through the same
    detokenizer and stop strings, and then skips as many characters as that replica had already delivered: the
    text it was still holding back (half a UTF-8 character, a possible stop-string prefix) comes out here, and
    nothing comes out twice."""

    def __init__(
        self, tokenizer: Tokenizer, context_ids: Sequence[int], stops: Sequence[str], *, special: bool = False
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, context_ids, special=special)
        self._stops = StopStrings(stops)
        self._skip = 0  # characters of output already delivered elsewhere
        self.stopped = False

    def resume(self, generated_ids: Sequence[int], delivered_chars: int) -> str:
        """Replay ids generated earlier of which `delivered_chars` characters of text were delivered; returns their
        text not delivered yet (possibly empty). Call once, before `push`."""
        self._skip = delivered_chars
        return self.push(generated_ids)

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, once `stopped` by one."""
        return self._stops.found

    def push(self, new_ids: Sequence[int]) -> str:
        """Text to send for these ids; sets `stopped` when a stop string ended the output."""
        if self.stopped:
            return ""
        out, self.stopped = self._stops.push(self._detok.push(new_ids))
        return self._unsent(out)

    def push_counted(self, new_ids: Sequence[int]) -> tuple[str, int]:
        """`push`, also saying how many of `new_ids` the output took: when a stop string ends it inside a run of
        several ids, the ids after the one that completed the stop string are not part of the completion."""
        if not self._stops.active or len(new_ids) <= 1:
            return self.push(new_ids), len(new_ids)
        out = ""
        for used, token in enumerate(new_ids, start=1):
            out += self.push([token])
            if self.stopped:
                return out, used
        return out, len(new_ids)

    def finish(self) -> str:
        """What is still held back once the engine has finished the sequence."""
        if self.stopped:
            return ""
        out, self.stopped = self._stops.push(self._detok.flush())
        return self._unsent(out if self.stopped else out + self._stops.flush())

    def _unsent(self, text: str) -> str:
        if self._skip and text:
            cut = min(self._skip, len(text))
            self._skip -= cut
            text = text[cut:]
        return text


class LogprobSpeller:
    """The engine's log probabilities (token ids) as the wire spells them: each token's text and bytes. A token's
    bytes that are not whole UTF-8 characters (half of a character split over tokens) are `\\xNN` escapes in its
    text, so different tokens never share a spelling. Spellings are cached per id (at most the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._spelled: dict[int, tuple[str, list[int]]] = {}

    def spell(self, token_id: int) -> tuple[str, list[int]]:
        found = self._spelled.get(token_id)
        if found is None:
            raw = self._tok.token_bytes(token_id)
            found = self._spelled[token_id] = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        return found

    def alternative(self, token_id: int, logprob: float | None) -> LogprobAlternative:
        text, raw = self.spell(token_id)
        return LogprobAlternative(token=text, logprob=logprob, bytes=raw)

    def entries(self, logprobs: Sequence[TokenLogprob]) -> list[WireLogprob]:
        return [self._entry(lp.token_id, lp) for lp in logprobs]

    def prompt_entries(self, prompt: Sequence[int], logprobs: Sequence[TokenLogprob | None]) -> list[WireLogprob]:
        """One per prompt token; the first (and any the engine could not predict) without a logprob."""
        return [self._entry(t, lp) for t, lp in zip(prompt, logprobs, strict=True)]

    def _entry(self, token_id: int, lp: TokenLogprob | None) -> WireLogprob:
        text, raw = self.spell(token_id)
        if lp is None:
            return WireLogprob(token=text, logprob=None, bytes=raw)
        top = [self.alternative(t, v) for t, v in lp.top]
        return WireLogprob(token=text, logprob=lp.logprob, bytes=raw, top=top)
