"""Anthropic's Messages API over the one answer path, so Claude Code and Anthropic-SDK agents run on lmfleet.

Routes (lmfleet.api.app adds them with `add_routes`)
    POST /v1/messages                 MessagesRequest -> Message | SSE of Anthropic's typed events
    POST /v1/messages/count_tokens    CountTokensRequest -> {"input_tokens"}

Owns:
  * the way a Messages request is answered: as the chat request it translates to (lmfleet.protocol.anthropic),
    validated by the chat path's own model (what it refuses is a 400 naming the Messages parameter) and answered
    by the one answer path like any chat request (lmfleet.api.answer: limits, the model, tool calls under the
    chat path's grammar, failover before the first token, token-exact resume after it, metrics);
  * `MessageRenderer`, that path's renderer for a message: the neutral deltas of its one choice become content
    blocks (thinking: the model's reasoning, before the answer's blocks; text; tool_use, whose `input` is the
    call's arguments) and, streamed, Anthropic's event stream (`event: <type>` + `data: {...}`): message_start
    (the message with no content, and the prompt's tokens), then per block content_block_start,
    content_block_delta (`thinking_delta`, `text_delta`, `input_json_delta`), content_block_stop, then
    message_delta (stop_reason, stop_sequence, usage) and message_stop. A failure after the 200 is an `error`
    event with Anthropic's error object (lmfleet.errors.anthropic_body), the last event;
  * counting a conversation's tokens the way it would be generated: the worker renders the same chat request
    through the model's chat template, tools included (`POST /worker/tokenize`);
  * `ERROR_PATHS`: these routes spell their errors Anthropic's way, every one of them (validation, unknown model,
    API key, limits, 429, 5xx, body too large, bad JSON): lmfleet.api.app puts errors.ErrorStyles in front.

Reasoning: a thinking block's `signature` is empty and no `signature_delta` is sent (lmfleet.protocol.anthropic
says why).

Does not own: parsing and translating requests (lmfleet.protocol.anthropic), the generation path, workers and
failover (lmfleet.api.answer, lmfleet.api.upstream), SSE framing (lmfleet.api.sse), the error JSON and its map
(lmfleet.errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from lmfleet import errors
from lmfleet.api.answer import AnswerPath
from lmfleet.api.oneshot import OneReply
from lmfleet.api.sse import Event
from lmfleet.api.upstream import ChoiceDelta
from lmfleet.metrics import CLIENT_CLOSED_REQUEST
from lmfleet.protocol.anthropic import (
    AnthropicError,
    AnthropicUsage,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    TokenCount,
    ToolUseBlock,
    anthropic_loc,
    new_id,
    stop_reason,
    tool_input,
)
from lmfleet.protocol.openai import ChatCompletionRequest, FinishReason
from lmfleet.protocol.openai import Usage as ChatUsage
from lmfleet.protocol.worker import TokenizeRequest as WorkerTokenize
from lmfleet.protocol.worker import TokenizeResponse as WorkerTokenized
from lmfleet.protocol.worker import ToolCallChunk

ERROR_PATHS = {"/v1/messages": "anthropic"}  # path (and below) -> error style (lmfleet.errors.STYLES)


# ---------------------------------------------------------------------------------------------------------------
# Neutral deltas -> content blocks and events


def _sse(events: Sequence[StreamEvent]) -> list[Event]:
    return [Event(event, type=event.type) for event in events]


class MessageRenderer:
    """One message being made from the answer path's deltas (lmfleet.api.answer.Renderer). Each step keeps
    `message` up to date (blocks in the order they began, a thinking or text block's text, a tool_use block's
    arguments, and at the end stop_reason and usage) and returns the stream events it makes; a non-streamed answer
    goes through the same steps and drops them, so both say the same. One block is open at a time: a delta of
    another kind closes it and begins the next."""

    def __init__(self, model: str) -> None:
        self.message = Message(id=new_id("msg"), model=model, usage=AnthropicUsage(input_tokens=0, output_tokens=0))
        self._current: int | None = None  # the index of the block being written
        self._calls: dict[int, int] = {}  # tool-call index -> its block's index
        self._arguments: dict[int, str] = {}  # a tool_use block's index -> its arguments' JSON so far
        self._finish_reason: FinishReason | None = None
        self._stop_string: str | None = None

    @property
    def id(self) -> str:
        return self.message.id

    # The answer path's hooks

    def start(self, usage: ChatUsage) -> list[Event]:
        self.message.usage = AnthropicUsage.of(usage)
        return _sse([MessageStartEvent(message=self.message.model_copy(deep=True))])

    def delta(self, delta: ChoiceDelta) -> list[Event]:
        self._finish_reason = delta.finish_reason or self._finish_reason
        self._stop_string = delta.stop_string or self._stop_string
        return _sse(self._add(delta))

    def end(self, usage: ChatUsage) -> list[Event]:
        return _sse(self._finish(self._finish_reason, self._stop_string, usage))

    def fail(self, exc: errors.LmfleetError) -> list[Event]:
        """The answer broke off after the 200: Anthropic's `error` event ends the stream."""
        return [Event(errors.anthropic_body(exc), type="error")]

    def answer(self, choices: Sequence[ChoiceDelta], usage: ChatUsage) -> Message:
        """The whole (non-streamed) answer, its one choice joined, as the finished message."""
        (choice,) = choices
        self._add(choice)
        self._finish(choice.finish_reason, choice.stop_string, usage)
        return self.message

    async def settle(self) -> None:
        """Nothing is kept once the answer is sent."""
        return None

    # Blocks and events

    def _add(self, delta: ChoiceDelta) -> list[StreamEvent]:
        """One delta: reasoning goes to the open thinking block (or a new one), text to the open text block (or a
        new one), tool-call pieces to tool_use blocks. The worker sends the reasoning before the answer."""
        events: list[StreamEvent] = []
        if delta.reasoning:
            events += self._open(ThinkingBlock)
            assert self._current is not None
            thinking = self.message.content[self._current]
            assert isinstance(thinking, ThinkingBlock)
            thinking.thinking += delta.reasoning
            events.append(ContentBlockDeltaEvent(index=self._current, delta=ThinkingDelta(thinking=delta.reasoning)))
        if delta.text:
            events += self._open(TextBlock)
            assert self._current is not None
            block = self.message.content[self._current]
            assert isinstance(block, TextBlock)
            block.text += delta.text
            events.append(ContentBlockDeltaEvent(index=self._current, delta=TextDelta(text=delta.text)))
        for piece in delta.tool_calls:
            events += self._call_piece(piece)
        return events

    def _begin(self, block: ThinkingBlock | TextBlock | ToolUseBlock) -> list[StreamEvent]:
        """Close the open block and start `block` after it."""
        events = self._close()
        self._current = len(self.message.content)
        self.message.content.append(block)
        events.append(ContentBlockStartEvent(index=self._current, content_block=block.model_copy(deep=True)))
        return events

    def _close(self) -> list[StreamEvent]:
        index, self._current = self._current, None
        return [] if index is None else [ContentBlockStopEvent(index=index)]

    def _open(self, kind: type[ThinkingBlock] | type[TextBlock]) -> list[StreamEvent]:
        """Keep writing the open block if it is of `kind`, else begin a new one."""
        if self._current is not None and isinstance(self.message.content[self._current], kind):
            return []
        return self._begin(kind())

    def _call_piece(self, piece: ToolCallChunk) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        index = self._calls.get(piece.index)
        if index is None:  # a new call: the worker sends calls one after another
            events += self._begin(ToolUseBlock(id=piece.id or new_id("toolu"), name=piece.name or ""))
            index = self._calls[piece.index] = len(self.message.content) - 1
            self._arguments[index] = ""
        if piece.arguments:
            self._arguments[index] += piece.arguments
            events.append(ContentBlockDeltaEvent(index=index, delta=InputJsonDelta(partial_json=piece.arguments)))
        return events

    def _finish(self, finish_reason: FinishReason | None, stop: str | None, usage: ChatUsage) -> list[StreamEvent]:
        """The answer ended: close the open block, give each tool_use block its input, then message_delta and
        message_stop."""
        events = self._close()
        for index, arguments in self._arguments.items():
            block = self.message.content[index]
            assert isinstance(block, ToolUseBlock)
            block.input = tool_input(arguments)
        message = self.message
        message.stop_reason = stop_reason(finish_reason, stop)
        message.stop_sequence = stop if message.stop_reason == "stop_sequence" else None
        message.usage = AnthropicUsage.of(usage)
        delta = MessageDelta(stop_reason=message.stop_reason, stop_sequence=message.stop_sequence)
        return [*events, MessageDeltaEvent(delta=delta, usage=message.usage), MessageStopEvent()]


# ---------------------------------------------------------------------------------------------------------------
# Requests -> the chat path


def _anthropic_param(name: str) -> str:
    """A chat request parameter (`stop.0`), as the Messages request names it."""
    return ".".join(map(str, anthropic_loc(name.split("."))))


def chat_request(body: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat request `body` is generated with, validated by the chat path's own model: what it refuses is a 400
    naming the Messages parameter. It names the model as the client did (the answer path resolves it)."""
    try:
        return ChatCompletionRequest.model_validate(body.chat_body())
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *anthropic_loc(e["loc"]))} for e in exc.errors(include_url=False)]
        ) from None


@dataclass(frozen=True)
class MessagesConfig:
    """What the routes need from the API server."""

    path: AnswerPath  # the one answer path (lmfleet.api.answer)
    one_reply: OneReply  # a worker's one reply (count_tokens: /worker/tokenize)


def add_routes(app: FastAPI, config: MessagesConfig, *, errors_doc: dict[int | str, dict[str, Any]]) -> None:
    """The Messages routes on `app` (whose route class is ParsedBodyRoute); `errors_doc`: the error answers the
    OpenAPI document lists for the other routes, listed here with Anthropic's body (lmfleet.errors)."""
    errors_doc = {status: {**doc, "model": AnthropicError} for status, doc in errors_doc.items()}
    stream_doc: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/event-stream": {"schema": {"type": "string", "description": "typed events"}}}}
    }

    @app.post("/v1/messages", response_model=Message, responses={**stream_doc, **errors_doc}, tags=["anthropic"])
    async def create_message(body: MessagesRequest, request: Request) -> Response:
        return await config.path.answer(request, chat_request(body), MessageRenderer, param=_anthropic_param)

    @app.post("/v1/messages/count_tokens", response_model=TokenCount, responses=errors_doc, tags=["anthropic"])
    async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
        chat = chat_request(body)

        def prompt(model: str) -> WorkerTokenize:
            generation = chat.to_generate_request("count-tokens", model)
            offered = generation.tools if generation.tool_choice != "none" else []
            return WorkerTokenize(model=model, messages=generation.messages, tools=offered)

        got = await config.one_reply(request, body.model, None, "/worker/tokenize", prompt, WorkerTokenized)
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(TokenCount(input_tokens=len(got[1].tokens)).model_dump())
