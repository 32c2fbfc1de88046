"""Worker chunks → OpenAI answers: one SSE stream or one JSON body, for chat and completions alike.

Owns, for one request already resolved to a model and translated into one `GenerateRequest` per choice:
  * opening every choice on a worker and holding its FIRST chunk before anything is sent (`open_choices`), so an
    early failure (400 context_length_exceeded, 404, 429, 503 from the worker) is a plain JSON error with the right
    status, never a 200 with an error inside;
  * merging the n choice streams in arrival order (`merge`), with back-pressure towards the workers;
  * spelling the result as SSE (`event_stream`: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`; an error after the
    200 is sent as `data: {"error": {...}}` then `[DONE]`) or as one JSON answer (`collect`);
  * cancellation: when the client goes away (`cancel_on_disconnect`, `EventStreamResponse`) the worker streams
    are closed, which closes their HTTP connections, and the workers abort the sequences.
The two endpoints differ only in how a chunk is spelled: `CHAT` and `COMPLETION` are the two `Shape` values.

Does not own: parsing requests (lmfleet.protocol.openai), picking workers (the caller passes `pick_worker`),
the HTTP transport (lmfleet.client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmfleet import errors
from lmfleet.client import WorkerClient
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
    Usage,
)
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest

logger = logging.getLogger("lmfleet.api")

T = TypeVar("T")
PickWorker = Callable[[], Awaitable[str]]  # the address of a live worker for the request's model

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


@dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one answer repeats: the same `id`, `created` and `model`."""

    id: str
    created: int
    model: str


# ---------------------------------------------------------------------------------------------------------------
# How each endpoint spells an answer


@dataclass(frozen=True)
class Shape:
    id_prefix: str
    # one streamed event for choice `index` (None: nothing worth sending); `first` is its first event
    event: Callable[[ResponseMeta, int, str, bool, FinishReason | None], BaseModel | None]
    usage_event: Callable[[ResponseMeta, Usage], BaseModel]  # `stream_options.include_usage`: empty `choices`
    answer: Callable[[ResponseMeta, list[tuple[int, str, FinishReason]], Usage], BaseModel]  # non-stream

    def new_meta(self, model: str) -> ResponseMeta:
        return ResponseMeta(id=f"{self.id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def _chat_event(meta: ResponseMeta, index: int, text: str, first: bool, finish: FinishReason | None):
    if not (text or first or finish):
        return None
    delta = ChatDelta(role="assistant", content=text) if first else ChatDelta(content=text or None)
    choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish)
    return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice])


def _completion_event(meta: ResponseMeta, index: int, text: str, first: bool, finish: FinishReason | None):
    if not (text or finish):
        return None
    choice = CompletionChunkChoice(index=index, text=text, finish_reason=finish)
    return CompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice])


CHAT = Shape(
    id_prefix="chatcmpl",
    event=_chat_event,
    usage_event=lambda meta, usage: ChatCompletionChunk(
        id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage
    ),
    answer=lambda meta, choices, usage: ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f) for i, t, f in choices],
        usage=usage,
    ),
)

COMPLETION = Shape(
    id_prefix="cmpl",
    event=_completion_event,
    usage_event=lambda meta, usage: CompletionChunk(
        id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage
    ),
    answer=lambda meta, choices, usage: Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, t, f in choices],
        usage=usage,
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# One choice, and the merge of n


@dataclass(frozen=True)
class ChoiceSpec:
    index: int  # the choice's `index` in the answer
    prompt_index: int  # which prompt it continues (usage counts each prompt once)
    request: GenerateRequest


def _raise_if_failed(chunk: GenerateChunk) -> None:
    """A worker reports a failure inside the stream (after its 200) with `error` or finish_reason abort/error."""
    if chunk.error is not None:
        raise errors.from_body(502, {"error": chunk.error.model_dump()})
    if chunk.finish_reason in ("abort", "error"):
        raise errors.UpstreamError(f"the worker ended the generation with finish_reason={chunk.finish_reason!r}")


class ChoiceStream:
    """One choice's worker stream, opened, with its first chunk in hand. Records the token counts it has seen."""

    def __init__(self, spec: ChoiceSpec, upstream: AsyncIterator[GenerateChunk], first: GenerateChunk) -> None:
        self.spec = spec
        self._upstream = upstream
        self._first: GenerateChunk | None = first
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    @classmethod
    async def open(cls, spec: ChoiceSpec, pick_worker: PickWorker, workers: WorkerClient) -> ChoiceStream:
        address = await pick_worker()
        upstream = workers.generate(address, spec.request)
        try:
            first = await _next_chunk(upstream)  # a worker's 4xx/5xx raises here, before any chunk
            if first is None:
                raise errors.UpstreamError("the worker closed the stream without sending anything")
            _raise_if_failed(first)
        except BaseException:
            await _aclose(upstream)
            raise
        return cls(spec, upstream, first)

    async def chunks(self) -> AsyncIterator[GenerateChunk]:
        """The chunks, the peeked one first, up to and including the one with `finish_reason`."""
        while True:
            chunk, self._first = self._first, None
            if chunk is None:
                chunk = await _next_chunk(self._upstream)
            if chunk is None:
                raise errors.UpstreamError("the worker's stream ended before the generation finished")
            _raise_if_failed(chunk)
            self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            self.finish_reason = cast(FinishReason | None, chunk.finish_reason)
            yield chunk
            if chunk.finish_reason is not None:
                return

    async def aclose(self) -> None:
        """Close the worker's HTTP stream (the worker aborts the sequence). Safe to call more than once."""
        await _aclose(self._upstream)


async def _next_chunk(upstream: AsyncIterator[GenerateChunk]) -> GenerateChunk | None:
    try:
        return await anext(upstream, None)
    except ValueError as exc:  # a line that is not a GenerateChunk: the worker's fault, not the client's
        raise errors.UpstreamError("the worker sent a malformed chunk") from exc


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def close_all(streams: Sequence[ChoiceStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def open_choices(
    specs: Sequence[ChoiceSpec], pick_worker: PickWorker, workers: WorkerClient
) -> list[ChoiceStream]:
    """Open every choice concurrently and wait for each first chunk. If any fails, close the others and raise the
    first error."""
    tasks = [asyncio.ensure_future(ChoiceStream.open(spec, pick_worker, workers)) for spec in specs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        opened = await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([s for s in opened if isinstance(s, ChoiceStream)])
        raise


async def merge(streams: Sequence[ChoiceStream]) -> AsyncIterator[tuple[ChoiceStream, GenerateChunk]]:
    """Chunks of all streams in arrival order. Each stream is read by its own task (so a cancelled consumer never
    interrupts a stream's cleanup half-way); the first error stops everything. Closing this generator closes every
    stream."""
    queue: asyncio.Queue[tuple[ChoiceStream, GenerateChunk | Exception | None]] = asyncio.Queue(len(streams))

    async def pump(stream: ChoiceStream) -> None:
        try:
            async with contextlib.aclosing(stream.chunks()) as chunks:
                async for chunk in chunks:
                    await queue.put((stream, chunk))
            await queue.put((stream, None))
        except Exception as exc:
            await queue.put((stream, exc))

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            stream, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield stream, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


def usage_of(streams: Sequence[ChoiceStream]) -> Usage:
    """Each prompt's tokens count once (n choices share a prompt); every choice's completion tokens count."""
    prompts: dict[int, int] = {}
    for s in streams:
        prompts[s.spec.prompt_index] = max(prompts.get(s.spec.prompt_index, 0), s.prompt_tokens)
    prompt_tokens = sum(prompts.values())
    completion_tokens = sum(s.completion_tokens for s in streams)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


# ---------------------------------------------------------------------------------------------------------------
# The two ways to answer


async def event_stream(
    streams: Sequence[ChoiceStream], shape: Shape, meta: ResponseMeta, *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body. Its first chunks are already in hand, so the 200 was right; a later failure becomes an
    error event. Always ends with `[DONE]` unless the client went away."""
    announced: set[int] = set()
    try:
        async with contextlib.aclosing(merge(streams)) as chunks:
            async for stream, chunk in chunks:
                index = stream.spec.index
                first = index not in announced
                finish = cast(FinishReason | None, chunk.finish_reason)  # abort/error raised in chunks()
                event = shape.event(meta, index, chunk.text, first, finish)
                if event is not None:
                    announced.add(index)
                    yield sse(event)
        if include_usage:
            yield sse(shape.usage_event(meta, usage_of(streams)))
    except errors.LmfleetError as exc:
        logger.warning("%s failed mid-stream: %s", meta.id, exc.message)
        yield sse(exc.body())
    except Exception:
        logger.exception("%s failed mid-stream", meta.id)
        yield sse(errors.LmfleetError("internal server error").body())
    yield DONE


async def collect(streams: Sequence[ChoiceStream], shape: Shape, meta: ResponseMeta) -> BaseModel:
    """The whole answer as one object, usage included."""
    texts: dict[int, list[str]] = {s.spec.index: [] for s in streams}
    async with contextlib.aclosing(merge(streams)) as chunks:
        async for stream, chunk in chunks:
            texts[stream.spec.index].append(chunk.text)
    choices = [(s.spec.index, "".join(texts[s.spec.index]), cast(FinishReason, s.finish_reason)) for s in streams]
    return shape.answer(meta, choices, usage_of(streams))


# ---------------------------------------------------------------------------------------------------------------
# Client disconnects


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T | None:
    """Run `work` until it finishes, or until the client disconnects: then cancel it and return None. Call it after
    the request body has been read (the next ASGI message is then the disconnect)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client went away, or we are being cancelled ourselves
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client goes away, on any ASGI server (it listens for the
    disconnect itself instead of waiting for a failed write), then run `cleanup` whatever happened."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], *, cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await cancel_on_disconnect(receive, self._send_all(send))
        finally:
            await _aclose(self.body_iterator)  # type: ignore[arg-type]
            await self._cleanup()

    async def _send_all(self, send: Send) -> None:
        with contextlib.suppress(OSError):  # ASGI 2.4 servers raise it on writes to a closed connection
            await self.stream_response(send)
