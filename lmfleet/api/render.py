"""`ChoiceDelta`s → OpenAI objects: how each endpoint spells one answer. Pure: no I/O, no workers, no SSE.

Owns, per response (one renderer is made for each, knowing its model):
  * what every object of the answer repeats (`ResponseMeta`: the same `id`, `created` and `model`);
  * a streamed chunk for one delta (`chunk`; None when the delta has nothing worth sending), the usage chunk that
    `stream_options.include_usage` asks for last (`usage_chunk`, with empty `choices`), and the whole non-streamed
    answer (`answer`, from each choice as one joined delta);
  * the difference between the two endpoints: `ChatRenderer` (chat.completion[.chunk]: the first chunk of each
    choice says `role: "assistant"`) and `CompletionRenderer` (text_completion).

Does not own: where deltas come from, failover, usage accounting (lmfleet.api.upstream), SSE framing, the JSON
response and client disconnects (lmfleet.api.sse), the models themselves (lmfleet.protocol.openai).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, cast

from pydantic import BaseModel

from lmfleet.api.upstream import ChoiceDelta
from lmfleet.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)


@dataclass(frozen=True)
class ResponseMeta:
    """What every object of one answer repeats: the same `id`, `created` and `model`."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, id_prefix: str, model: str) -> ResponseMeta:
        return cls(id=f"{id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


class Renderer(Protocol):
    """One response's spelling. `chunk` is called for every delta in arrival order and may keep state."""

    meta: ResponseMeta

    def chunk(self, delta: ChoiceDelta) -> BaseModel | None: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> BaseModel: ...


class _OneResponse:
    id_prefix: ClassVar[str]

    def __init__(self, model: str) -> None:
        self.meta = ResponseMeta.new(self.id_prefix, model)


def _finished(choice: ChoiceDelta) -> FinishReason:
    return cast(FinishReason, choice.finish_reason)  # a choice ends with its finish_reason (upstream)


def _message(choice: ChoiceDelta) -> AssistantMessage:
    """A whole choice as an assistant message; `content` is null when the answer is only tool calls."""
    calls = [
        ToolCall(id=c.id or "", function=FunctionCall(name=c.name or "", arguments=c.arguments))
        for c in choice.tool_calls
    ]
    return AssistantMessage(content=choice.text or (None if calls else ""), tool_calls=calls or None)


class ChatRenderer(_OneResponse):
    """/v1/chat/completions: `chat.completion.chunk`s, the first of each choice with `role`, then a
    `chat.completion`."""

    id_prefix = "chatcmpl"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._announced: set[int] = set()  # choices whose first chunk (the one with `role`) has been made

    def chunk(self, delta: ChoiceDelta) -> ChatCompletionChunk | None:
        first = delta.index not in self._announced
        if not (delta.text or first or delta.finish_reason or delta.tool_calls):
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
        content = ChatDelta(role="assistant" if first else None, content=text, tool_calls=calls or None)
        choice = ChatChunkChoice(index=delta.index, delta=content, finish_reason=delta.finish_reason)
        return ChatCompletionChunk(id=self.meta.id, created=self.meta.created, model=self.meta.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        meta = self.meta
        return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> ChatCompletion:
        return ChatCompletion(
            id=self.meta.id,
            created=self.meta.created,
            model=self.meta.model,
            choices=[ChatChoice(index=c.index, message=_message(c), finish_reason=_finished(c)) for c in choices],
            usage=usage,
        )


class CompletionRenderer(_OneResponse):
    """/v1/completions: `text_completion` chunks, then one `text_completion`."""

    id_prefix = "cmpl"

    def chunk(self, delta: ChoiceDelta) -> CompletionChunk | None:
        if not (delta.text or delta.finish_reason):
            return None
        choice = CompletionChunkChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason)
        return CompletionChunk(id=self.meta.id, created=self.meta.created, model=self.meta.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        meta = self.meta
        return CompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage)

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> Completion:
        return Completion(
            id=self.meta.id,
            created=self.meta.created,
            model=self.meta.model,
            choices=[CompletionChoice(index=c.index, text=c.text, finish_reason=_finished(c)) for c in choices],
            usage=usage,
        )
