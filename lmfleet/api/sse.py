"""Opened choices → an HTTP answer: one SSE stream or one JSON body, and what happens when the client goes away.

Owns:
  * the SSE body (`event_stream`: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`). The first chunk of every
    choice was in hand before the 200, so the 200 was right; a failure after it is sent as
    `data: {"error": {...}}` then `[DONE]`, and logged;
  * the non-streamed answer (`collect`): every delta gathered, each choice joined, usage included;
  * cancellation: when the client goes away (`cancel_on_disconnect`, `EventStreamResponse`) the work in progress
    is cancelled and the worker streams closed, which closes their HTTP connections, and the workers abort the
    sequences.

Does not own: opening, failover, merging and usage accounting (lmfleet.api.upstream), how a chunk or an answer
is spelled (lmfleet.api.render), the error JSON (lmfleet.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmfleet import errors
from lmfleet.api.render import Renderer
from lmfleet.api.upstream import ChoiceDelta, ChoiceStream, joined, merge, usage_of

logger = logging.getLogger("lmfleet.api")

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The two ways to answer


async def event_stream(
    streams: Sequence[ChoiceStream], renderer: Renderer, *, include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body. Always ends with `[DONE]` unless the client went away."""
    try:
        async with contextlib.aclosing(merge(streams)) as deltas:
            async for delta in deltas:
                chunk = renderer.chunk(delta)
                if chunk is not None:
                    yield sse(chunk)
        if include_usage:
            yield sse(renderer.usage_chunk(usage_of(streams)))
    except errors.LmfleetError as exc:
        logger.warning("%s failed mid-stream: %s", renderer.meta.id, exc.message)
        yield sse(exc.body())
    except Exception:
        logger.exception("%s failed mid-stream", renderer.meta.id)
        yield sse(errors.LmfleetError("internal server error").body())
    yield DONE


async def collect(streams: Sequence[ChoiceStream], renderer: Renderer) -> BaseModel:
    """The whole answer as one object, usage included; the choices in the order of `streams`."""
    deltas: dict[int, list[ChoiceDelta]] = {s.spec.index: [] for s in streams}
    async with contextlib.aclosing(merge(streams)) as merged:
        async for delta in merged:
            deltas[delta.index].append(delta)
    return renderer.answer([joined(deltas[s.spec.index]) for s in streams], usage_of(streams))


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
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
            await self._cleanup()

    async def _send_all(self, send: Send) -> None:
        with contextlib.suppress(OSError):  # ASGI 2.4 servers raise it on writes to a closed connection
            await self.stream_response(send)
