"""Server-sent events, and what happens when the client goes away.

Owns:
  * the framing of one event (`Event.encode`): `data: {json}\\n\\n`, with an `event: <type>` line before it for
    protocols that name their events (Responses); `DONE` is chat and completions' `data: [DONE]`;
  * `EventStreamResponse`: a stream of encoded events that stops as soon as the client goes away, then runs its
    cleanup (which closes the worker streams, so the workers abort the sequences);
  * `cancel_on_disconnect`: any other work (opening the choices, collecting a whole answer, one-reply routes) is
    cancelled when the client goes away.

Does not own: which events an answer is made of (each endpoint's renderer: lmfleet.api.render,
lmfleet.api.responses), driving a renderer from the workers' deltas (lmfleet.api.answer), the error JSON
(lmfleet.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Event:
    """One server-sent event: `data` as JSON (a model or a dict) or as it is (a string such as `[DONE]`), under
    an `event:` type when the protocol names its events."""

    data: BaseModel | dict[str, Any] | str
    type: str | None = None

    def encode(self) -> bytes:
        data = self.data
        if isinstance(data, BaseModel):
            text = data.model_dump_json()
        elif isinstance(data, dict):
            text = json.dumps(data)
        else:
            text = data
        head = b"" if self.type is None else b"event: " + self.type.encode() + b"\n"
        return head + b"data: " + text.encode() + b"\n\n"


DONE = Event("[DONE]")  # the last event of a chat or completions stream


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
