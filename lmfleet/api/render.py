"""`ChoiceDelta`s → OpenAI objects: how chat and completions spell one answer, as renderers of the one answer
path (lmfleet.api.answer.Renderer). Pure: no I/O, no workers.

Owns, per response (one renderer is made for each, knowing its model):
  * what every object of the answer repeats (`ResponseMeta`: the same `id`, `created` and `model`);
  * the stream both endpoints share: a `data:` event per chunk, for each delta that has something worth sending
    (`chunk`), the usage chunk that `stream_options.include_usage` asks for last (`usage_chunk`, with empty
    `choices`), then `[DONE]`; a failure after the 200 is `data: {"error": {...}}` (lmfleet.errors), then
    `[DONE]`;
  * the whole non-streamed answer (`answer`, from each choice as one joined delta);
  * the difference between the two endpoints: `ChatRenderer` (chat.completion[.chunk]: the first chunk of each
    choice says `role: "assistant"`; a model's reasoning in `reasoning_content` and `reasoning`, apart from
    `content`) and `CompletionRenderer` (text_completion: the raw text, reasoning never split from it);
  * log probabilities in each endpoint's shape (chat: `logprobs.content[]`; completions: the parallel lists
    `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), streamed with the chunk that carries their text
    (entries of tokens whose text is held back wait for the next chunk sent).

Does not own: where deltas come from, failover, usage accounting (lmfleet.api.upstream), when each hook runs, the
JSON response and client disconnects (lmfleet.api.answer), SSE framing (lmfleet.api.sse), the models themselves
(lmfleet.protocol.openai).
"""

from __future__ import annotations

import codecs
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

from pydantic import BaseModel

from lmfleet import errors
from lmfleet.api.sse import DONE, Event
from lmfleet.api.upstream import ChoiceDelta
from lmfleet.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from lmfleet.protocol.worker import LogprobAlternative, TokenLogprob


@dataclass(frozen=True)
class ResponseMeta:
    """What every object of one answer repeats: the same `id`, `created` and `model`."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, id_prefix: str, model: str) -> ResponseMeta:
        return cls(id=f"{id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


class _OneResponse(ABC):
    """What chat and completions share: the stream's shape around the chunks each spells."""

    id_prefix: ClassVar[str]

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.meta = ResponseMeta.new(self.id_prefix, model)
        self._include_usage = include_usage  # stream_options.include_usage: a usage chunk last
        self._held: dict[int, list[TokenLogprob]] = {}  # per choice: entries not sent yet (their text is held back)

    @property
    def id(self) -> str:
        return self.meta.id

    @abstractmethod
    def chunk(self, delta: ChoiceDelta) -> BaseModel | None:
        """The chunk for one delta; None when it has nothing worth sending."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    @abstractmethod
    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> BaseModel: ...

    def start(self, usage: Usage) -> list[Event]:
        return []

    def delta(self, delta: ChoiceDelta) -> list[Event]:
        chunk = self.chunk(delta)
        return [] if chunk is None else [Event(chunk)]

    def end(self, usage: Usage) -> list[Event]:
        return [Event(self.usage_chunk(usage)), DONE] if self._include_usage else [DONE]

    def fail(self, exc: errors.LmfleetError) -> list[Event]:
        return [Event(exc.body()), DONE]

    async def settle(self) -> None:
        """Nothing is kept once the answer is sent."""
        return None

    def _logprobs(self, delta: ChoiceDelta, sending: bool) -> list[TokenLogprob] | None:
        """The entries to send with this delta's chunk (None: not asked for); held back when no chunk is sent."""
        if delta.logprobs is None:
            return None
        held = self._held.setdefault(delta.index, [])
        held.extend(delta.logprobs)
        if not sending:
            return None
        self._held[delta.index] = []
        return held


def _finished(choice: ChoiceDelta) -> FinishReason:
    return cast(FinishReason, choice.finish_reason)  # a choice ends with its finish_reason (upstream)


def _message(choice: ChoiceDelta) -> AssistantMessage:
    """A whole choice as an assistant message; `content` is null when the answer is only tool calls."""
    calls = [
        ToolCall(id=c.id or "", function=FunctionCall(name=c.name or "", arguments=c.arguments))
        for c in choice.tool_calls
    ]
    reasoning = choice.reasoning or None
    return AssistantMessage(
        content=choice.text or (None if calls else ""),
        tool_calls=calls or None,
        reasoning_content=reasoning,
        reasoning=reasoning,
    )


class ChatRenderer(_OneResponse):
    """/v1/chat/completions: `chat.completion.chunk`s, the first of each choice with `role`, then a
    `chat.completion`."""

    id_prefix = "chatcmpl"

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        super().__init__(model, include_usage=include_usage)
        self._announced: set[int] = set()  # choices whose first chunk (the one with `role`) has been made

    def chunk(self, delta: ChoiceDelta) -> ChatCompletionChunk | None:
        first = delta.index not in self._announced
        sending = bool(delta.text or delta.reasoning or first or delta.finish_reason or delta.tool_calls)
        logprobs = self._logprobs(delta, sending)
        if not sending:
            return None
        self._announced.add(delta.index)
        calls = [
            ToolCallDelta(
                index=c.index,
                id=c.id,
                type="function" if c.id else None,
                function=FunctionCallDelta(name=c.name, arguments=c.arguments),
            )
            for c in delta.tool_calls
        ]
        text = delta.text if first and not calls else delta.text or None
        reasoning = delta.reasoning or None
        content = ChatDelta(
            role="assistant" if first else None,
            content=text,
            tool_calls=calls or None,
            reasoning_content=reasoning,
            reasoning=reasoning,
        )
        choice = ChatChunkChoice(
            index=delta.index, delta=content, finish_reason=delta.finish_reason, logprobs=_chat_logprobs(logprobs)
        )
        return ChatCompletionChunk(id=self.meta.id, created=self.meta.created, model=self.meta.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        meta = self.meta
        return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> ChatCompletion:
        return ChatCompletion(
            id=self.meta.id,
            created=self.meta.created,
            model=self.meta.model,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=_message(c),
                    finish_reason=_finished(c),
                    logprobs=_chat_logprobs(c.logprobs, whole=True),
                )
                for c in choices
            ],
            usage=usage,
        )


class CompletionRenderer(_OneResponse):
    """/v1/completions: `text_completion` chunks, then one `text_completion`."""

    id_prefix = "cmpl"

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        super().__init__(model, include_usage=include_usage)
        self._offsets: dict[int, _TextOffsets] = {}

    def chunk(self, delta: ChoiceDelta) -> CompletionChunk | None:
        sending = bool(delta.text or delta.finish_reason)
        logprobs = self._logprobs(delta, sending)
        if not sending:
            return None
        offsets = self._offsets.setdefault(delta.index, _TextOffsets())
        choice = CompletionChunkChoice(
            index=delta.index,
            text=delta.text,
            finish_reason=delta.finish_reason,
            logprobs=_completion_logprobs(logprobs, offsets),
        )
        return CompletionChunk(id=self.meta.id, created=self.meta.created, model=self.meta.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        meta = self.meta
        return CompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> Completion:
        return Completion(
            id=self.meta.id,
            created=self.meta.created,
            model=self.meta.model,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    finish_reason=_finished(c),
                    logprobs=_completion_logprobs(c.logprobs, _TextOffsets(), whole=True),
                )
                for c in choices
            ],
            usage=usage,
        )


def _alternative(entry: LogprobAlternative) -> TopLogprob:
    return TopLogprob(token=entry.token, logprob=entry.logprob or 0.0, bytes=entry.bytes)


def _chat_logprobs(entries: Sequence[TokenLogprob] | None, *, whole: bool = False) -> ChatLogprobs | None:
    """Chat's shape; a streamed chunk without entries has none (`null`), a whole answer an empty list."""
    if entries is None or not (entries or whole):
        return None
    content = [
        ChatTokenLogprob(**_alternative(e).model_dump(), top_logprobs=[_alternative(t) for t in e.top]) for e in entries
    ]
    return ChatLogprobs(content=content)


class _TextOffsets:
    """Character offsets of tokens in a choice's text (echo included): a token starts after every whole character
    of the bytes before it."""

    def __init__(self) -> None:
        self.chars = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_bytes: Sequence[int]) -> int:
        start = self.chars
        self.chars += len(self._utf8.decode(bytes(token_bytes)))
        return start


def _completion_logprobs(
    entries: Sequence[TokenLogprob] | None, offsets: _TextOffsets, *, whole: bool = False
) -> CompletionLogprobs | None:
    """The completions shape; the sampled token is in its own top_logprobs too (as OpenAI: up to logprobs + 1)."""
    if entries is None or not (entries or whole):
        return None
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[
            None if e.logprob is None else {**{t.token: t.logprob or 0.0 for t in e.top}, e.token: e.logprob}
            for e in entries
        ],
        text_offset=[offsets.advance(e.bytes) for e in entries],
    )
