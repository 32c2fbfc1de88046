"""OpenAI's Responses API over the one answer path.

Routes (lmfleet.api.app adds them with `add_routes`)
    POST   /v1/responses                     CreateResponseRequest -> Response | SSE of typed events
    GET    /v1/responses/{id}                a stored Response
    DELETE /v1/responses/{id}                {"id", "object": "response", "deleted": true}
    GET    /v1/responses/{id}/input_items    the input items a stored response was generated from

Owns:
  * the way a Responses request is answered: as the chat request it translates to (lmfleet.protocol.responses),
    validated by the chat path's own model and answered by the one answer path like any chat request
    (lmfleet.api.answer: limits, the model, failover before the first token, token-exact resume after it);
  * `ResponseRenderer`, that path's renderer for a response: the neutral deltas of its one choice (text,
    tool-call pieces, finish reason) and usage become output items, and, streamed, the typed SSE stream
    (`event: <type>` + `data: {...}`, numbered by `sequence_number`): response.created, .in_progress,
    output_item.added, content_part.added, output_text.delta ..., output_text.done, content_part.done,
    output_item.done (function calls: function_call_arguments.delta / .done; a model's reasoning, before the
    answer: a `reasoning` item whose one `reasoning_text` part streams as reasoning_text.delta / .done), then
    response.completed, or response.incomplete when `max_output_tokens` cut the answer. A failure after the 200 is
    an `error` event followed by response.failed;
  * `store` / `previous_response_id`: a finished response is stored (lmfleet.api.response_store) before its last
    event or its body is sent (the renderer's `settle`), so the client may continue it at once. Stored responses
    belong to the API key that made them.

Does not own: parsing and translating requests (lmfleet.protocol.responses), the generation path, workers and
failover (lmfleet.api.answer, lmfleet.api.upstream), SSE framing (lmfleet.api.sse), the database
(lmfleet.api.response_store).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.responses import Response as HttpResponse
from pydantic import ValidationError

from lmfleet import errors
from lmfleet.api.access import presented_key
from lmfleet.api.answer import AnswerPath
from lmfleet.api.response_store import ResponseStore, Stored
from lmfleet.api.sse import Event
from lmfleet.api.upstream import ChoiceDelta
from lmfleet.protocol.openai import ChatCompletionRequest, FinishReason, Usage
from lmfleet.protocol.responses import (
    CHAT_PARAMS,
    INPUT_ITEMS,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    CreateResponseRequest,
    DeletedResponse,
    ErrorEvent,
    FunctionCall,
    IncompleteDetails,
    InputItem,
    ItemList,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningOutput,
    ReasoningText,
    Response,
    ResponseError,
    ResponseEvent,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
    new_id,
    with_ids,
)
from lmfleet.protocol.worker import ToolCallChunk

logger = logging.getLogger("lmfleet.api")

Persist = Callable[[Response], Awaitable[None]]


# ---------------------------------------------------------------------------------------------------------------
# Neutral deltas -> output items and events


def _sse(events: list[StreamEvent]) -> list[Event]:
    return [Event(event, type=event.type) for event in events]


class ResponseRenderer:
    """One response being made from the answer path's deltas (lmfleet.api.answer.Renderer). Each step keeps
    `response` up to date (output items in the order they began, a message's text, a call's arguments, and at the
    end status and usage) and returns the stream events it makes (a non-streamed answer goes through the same
    steps and drops them). `persist` stores the finished response (`settle`)."""

    def __init__(self, response: Response, persist: Persist | None = None) -> None:
        self.response = response
        self._persist = persist
        self._sequence = itertools.count()
        self._index: dict[str, int] = {}  # output item id -> its output_index
        self._message: OutputMessage | None = None  # the message being written
        self._reasoning: ReasoningOutput | None = None  # the reasoning being written
        self._calls: dict[int, FunctionCall] = {}  # tool-call index -> its function call, until done
        self._finish_reason: FinishReason | None = None

    @property
    def id(self) -> str:
        return self.response.id

    # The answer path's hooks

    def start(self, usage: Usage) -> list[Event]:
        return _sse([self._lifecycle("created"), self._lifecycle("in_progress")])

    def delta(self, delta: ChoiceDelta) -> list[Event]:
        self._finish_reason = delta.finish_reason or self._finish_reason
        return _sse(self._add(delta))

    def end(self, usage: Usage) -> list[Event]:
        return _sse(self._finish(self._finish_reason, usage))

    def fail(self, exc: errors.LmfleetError) -> list[Event]:
        """The answer broke off after the 200: an `error` event, then response.failed with what was made."""
        for item in self.response.output:
            if item.status == "in_progress":
                item.status = "incomplete"
        self._message, self._reasoning, self._calls = None, None, {}
        response = self.response
        response.status, response.completed_at = "failed", None
        code: Literal["rate_limit_exceeded", "server_error"] = (
            "rate_limit_exceeded" if isinstance(exc, errors.QueueFull) else "server_error"
        )
        response.error = ResponseError(code=code, message=exc.message)
        error = self._event(ErrorEvent, code=exc.code or code, message=exc.message, param=exc.param)
        return _sse([error, self._lifecycle("failed")])

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> Response:
        """The whole (non-streamed) answer, its one choice joined, as the finished response."""
        (choice,) = choices
        self._add(choice)
        self._finish(choice.finish_reason, usage)
        return self.response

    async def settle(self) -> None:
        """Store the response, finished or failed, before its last event or its body is sent."""
        if self._persist is None:
            return
        try:
            await self._persist(self.response)
        except Exception as exc:
            logger.exception("%s could not be stored", self.response.id)
            raise errors.LmfleetError("the response could not be stored") from exc

    # Items and events

    def _event(self, cls: type[StreamEvent], **fields: Any) -> StreamEvent:
        return cls(sequence_number=next(self._sequence), **fields)

    def _lifecycle(self, kind: str) -> StreamEvent:
        return self._event(ResponseEvent, type=f"response.{kind}", response=self.response.model_copy(deep=True))

    def _add_item(self, item: OutputItem) -> StreamEvent:
        self._index[item.id] = len(self.response.output)
        self.response.output.append(item)
        return self._event(
            OutputItemEvent,
            type="response.output_item.added",
            output_index=self._index[item.id],
            item=item.model_copy(deep=True),
        )

    def _done_item(self, item: OutputItem, status: Literal["completed", "incomplete"]) -> StreamEvent:
        item.status = status
        return self._event(
            OutputItemEvent,
            type="response.output_item.done",
            output_index=self._index[item.id],
            item=item.model_copy(deep=True),
        )

    def _add(self, delta: ChoiceDelta) -> list[StreamEvent]:
        """One delta: reasoning goes to the open reasoning item, text to the open message, tool-call pieces to
        function calls; the reasoning is complete once anything else comes."""
        events = []
        if delta.reasoning:
            events += self._reason(delta.reasoning)
        if delta.text or delta.tool_calls:
            events += self._close_reasoning("completed")
        if delta.text:
            events += self._open_message()
            message = self._message
            assert message is not None
            message.content[0].text += delta.text
            index = self._index[message.id]
            events.append(self._event(TextDeltaEvent, item_id=message.id, output_index=index, delta=delta.text))
        for piece in delta.tool_calls:
            events += self._call_delta(piece)
        return events

    def _reason(self, text: str) -> list[StreamEvent]:
        events = []
        item = self._reasoning
        if item is None:
            item = self._reasoning = ReasoningOutput(id=new_id("rs"))
            events.append(self._add_item(item))
            item.content.append(ReasoningText())
            where = {"item_id": item.id, "output_index": self._index[item.id], "content_index": 0}
            added = self._event(ContentPartEvent, type="response.content_part.added", part=ReasoningText(), **where)
            events.append(added)
        item.content[0].text += text
        events.append(self._event(ReasoningDeltaEvent, item_id=item.id, output_index=self._index[item.id], delta=text))
        return events

    def _close_reasoning(self, status: Literal["completed", "incomplete"]) -> list[StreamEvent]:
        item, self._reasoning = self._reasoning, None
        if item is None:
            return []
        part = item.content[0]
        where = {"item_id": item.id, "output_index": self._index[item.id], "content_index": 0}
        return [
            self._event(ReasoningDoneEvent, text=part.text, **where),
            self._event(ContentPartEvent, type="response.content_part.done", part=part.model_copy(), **where),
            self._done_item(item, status),
        ]

    def _open_message(self) -> list[StreamEvent]:
        if self._message is not None:
            return []
        message = self._message = OutputMessage(id=new_id("msg"))
        added = self._add_item(message)
        message.content.append(OutputText())
        part = self._event(
            ContentPartEvent,
            type="response.content_part.added",
            item_id=message.id,
            output_index=self._index[message.id],
            content_index=0,
            part=OutputText(),
        )
        return [added, part]

    def _close_message(self, status: Literal["completed", "incomplete"]) -> list[StreamEvent]:
        message, self._message = self._message, None
        if message is None:
            return []
        index, part = self._index[message.id], message.content[0]
        where = {"item_id": message.id, "output_index": index, "content_index": 0}
        return [
            self._event(TextDoneEvent, text=part.text, **where),
            self._event(ContentPartEvent, type="response.content_part.done", part=part.model_copy(), **where),
            self._done_item(message, status),
        ]

    def _call_delta(self, piece: ToolCallChunk) -> list[StreamEvent]:
        events = []
        item = self._calls.get(piece.index)
        if item is None:  # what came before a new call is complete: items are made one after another
            events += self._close_message("completed") + self._close_calls("completed")
            item = FunctionCall(id=new_id("fc"), call_id=piece.id or new_id("call"), name=piece.name or "")
            self._calls[piece.index] = item
            events.append(self._add_item(item))
        if piece.arguments:
            item.arguments += piece.arguments
            events.append(
                self._event(
                    ArgumentsDeltaEvent, item_id=item.id, output_index=self._index[item.id], delta=piece.arguments
                )
            )
        return events

    def _close_calls(self, status: Literal["completed", "incomplete"]) -> list[StreamEvent]:
        events = []
        for item in self._calls.values():
            if item.status == "in_progress":
                where = {"item_id": item.id, "output_index": self._index[item.id]}
                events.append(self._event(ArgumentsDoneEvent, name=item.name, arguments=item.arguments, **where))
                events.append(self._done_item(item, status))
        return events

    def _finish(self, finish_reason: str | None, usage: Usage) -> list[StreamEvent]:
        """The answer ended with `finish_reason`: close every item, then response.completed (or .incomplete when
        the token limit cut it)."""
        cut = finish_reason == "length"
        status: Literal["completed", "incomplete"] = "incomplete" if cut else "completed"
        events = self._close_reasoning(status)
        if not any(item.type != "reasoning" for item in self.response.output):
            events += self._open_message()  # an empty answer is an empty message
        events += self._close_message(status) + self._close_calls(status)
        response = self.response
        response.status = status
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens") if cut else None
        response.completed_at = None if cut else int(time.time())
        response.usage = ResponseUsage.of(usage)
        return [*events, self._lifecycle(status)]


# ---------------------------------------------------------------------------------------------------------------
# Requests -> the chat path


def _responses_loc(loc: Sequence[Any]) -> tuple[Any, ...]:
    """A chat request parameter's location, as the Responses request names it."""
    if not loc or loc[0] not in CHAT_PARAMS:
        return tuple(loc)
    if loc[0] == "messages":  # chat message i is not input item i (instructions, earlier items, joined calls)
        return ("input",)
    return (*CHAT_PARAMS[loc[0]].split("."), *loc[1:])


def _responses_param(name: str) -> str:
    """A chat request parameter (`stop.0`), as the Responses request names it."""
    return ".".join(map(str, _responses_loc(name.split("."))))


def chat_request(body: CreateResponseRequest, earlier: Sequence[InputItem]) -> ChatCompletionRequest:
    """The chat request `body` is generated with, validated by the chat path's own model: what it refuses is a 400
    naming the Responses parameter. It names the model as the client did (the answer path resolves it)."""
    chat_body = {**body.chat_body(body.model or "", earlier), "model": body.model}
    try:
        chat = ChatCompletionRequest.model_validate(chat_body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *_responses_loc(e["loc"]))} for e in exc.errors(include_url=False)]
        ) from None
    for sent, parsed in zip(chat_body["messages"], chat.messages, strict=True):
        if sent.get("tool_calls") and not getattr(parsed, "tool_calls", None):  # the chat path dropped them
            raise errors.InvalidRequest(
                "function_call input items are not supported by this server yet", param="input", code="unsupported"
            )
    return chat


def earlier_items(stored: Stored) -> list[InputItem]:
    """A stored response's conversation, to continue: its input items, then its output items."""
    response = Response.model_validate(stored.response)
    return [*INPUT_ITEMS.validate_python(stored.input_items), *(item.as_input() for item in response.output)]


@dataclass(frozen=True)
class ResponsesConfig:
    """What the routes need from the API server."""

    path: AnswerPath  # the one answer path (lmfleet.api.answer)
    scoped: bool  # API keys are configured: a stored response belongs to the key that made it


def _owner(request: Request, config: ResponsesConfig) -> str:
    """Whose stored responses a request may see: a digest of its API key (never the key itself)."""
    if not config.scoped:
        return ""
    token = presented_key(request.headers) or ""
    return hashlib.sha256(token.encode("latin-1", "replace")).hexdigest()


def _not_found(response_id: str) -> errors.NotFound:
    return errors.NotFound(f"Response with id '{response_id}' not found.", param="response_id")


async def _stored(request: Request, config: ResponsesConfig, response_id: str) -> Stored:
    store: ResponseStore | None = request.state.responses
    stored = await store.get(_owner(request, config), response_id) if store is not None else None
    if stored is None:
        raise _not_found(response_id)
    return stored


# One typed server-sent event, as OpenAPI tools (schemathesis; OpenAPI 3.2's `itemSchema`) read an event stream.
_TYPED_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "description": "The event's type (response.created, ..., response.completed)"},
        "data": {"type": "string", "description": "The event as JSON"},
    },
}


def add_routes(app: FastAPI, config: ResponsesConfig, *, errors_doc: dict[int | str, dict[str, Any]]) -> None:
    """The Responses routes on `app` (whose route class is ParsedBodyRoute); `errors_doc`: the error answers the
    OpenAPI document lists for each."""
    stream_doc: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": _TYPED_EVENT}}}}

    @app.post("/v1/responses", response_model=Response, responses={**stream_doc, **errors_doc}, tags=["openai"])
    async def create_response(body: CreateResponseRequest, request: Request) -> HttpResponse:
        store: ResponseStore | None = request.state.responses
        owner = _owner(request, config)
        earlier: list[InputItem] = []
        if body.previous_response_id is not None:
            if store is None:
                raise errors.InvalidRequest(
                    "previous_response_id needs stored responses, and this server does not store them",
                    param="previous_response_id",
                )
            stored = await store.get(owner, body.previous_response_id)
            if stored is None:
                raise errors.InvalidRequest(
                    f"Previous response with id '{body.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            earlier = earlier_items(stored)
        if not earlier and not body.input:
            raise errors.InvalidRequest("input: give at least one input item", param="input")
        chat = chat_request(body, earlier)
        kept = store is not None and body.store is not False
        items = [*earlier, *with_ids(body.input)]
        persist = partial(_persist, store, owner, items) if store is not None and kept else None

        def renderer_for(model: str) -> ResponseRenderer:
            response = Response(
                id=new_id("resp"), created_at=int(time.time()), model=model, store=kept, **body.echoed()
            )
            return ResponseRenderer(response, persist)

        return await config.path.answer(request, chat, renderer_for, param=_responses_param)

    @app.get("/v1/responses/{response_id}", response_model=Response, responses=errors_doc, tags=["openai"])
    async def retrieve_response(
        response_id: str, request: Request, stream: bool = Query(False, description="Not supported (only false).")
    ) -> JSONResponse:
        if stream:
            raise errors.InvalidRequest("replaying a stored response as events is not supported", param="stream")
        return JSONResponse((await _stored(request, config, response_id)).response)

    @app.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=errors_doc, tags=["openai"])
    async def delete_response(response_id: str, request: Request) -> DeletedResponse:
        store: ResponseStore | None = request.state.responses
        if store is None or not await store.delete(_owner(request, config), response_id):
            raise _not_found(response_id)
        return DeletedResponse(id=response_id)

    @app.get("/v1/responses/{response_id}/input_items", response_model=ItemList, responses=errors_doc, tags=["openai"])
    async def list_input_items(
        response_id: str,
        request: Request,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = Query(None, description="An item id: list the items after it."),
    ) -> ItemList:
        stored = await _stored(request, config, response_id)
        items = [item.resource() for item in INPUT_ITEMS.validate_python(stored.input_items)]
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return ItemList(
            data=page,
            first_id=page[0]["id"] if page else None,
            last_id=page[-1]["id"] if page else None,
            has_more=len(items) > limit,
        )


async def _persist(store: ResponseStore, owner: str, items: list[InputItem], response: Response) -> None:
    await store.put(owner, response.model_dump(mode="json"), [item.model_dump(by_alias=True) for item in items])
