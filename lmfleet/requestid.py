"""`X-Request-ID`: one id per HTTP request, in every log line about it and passed from the API server to the worker.

Owns
  * `RequestIdMiddleware`: takes the client's `X-Request-ID` (kept to `[A-Za-z0-9._:-]`, at most `MAX_LENGTH`
    characters; anything else is dropped, and nothing left means none was sent) or makes one, holds it in a
    context variable while the request runs (its tasks inherit it), and returns it on every response, errors
    included. Outermost, so a refusal by any other middleware carries it too;
  * `current()`: the id of the request this code runs for (None outside one): lmfleet.client sends it to the
    worker, so one id names a request in the API server's log and in the worker's;
  * `RequestIdFilter`: a logging filter that puts it on every record (`request_id`; lmfleet.server formats it).

Does not own: the log format (lmfleet.server), the engine's request ids (the API server's `GenerateRequest.request_id`
names one choice's generation).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
MAX_LENGTH = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")

_current: ContextVar[str | None] = ContextVar("lmfleet_request_id", default=None)


def current() -> str | None:
    return _current.get()


def sanitize(raw: str | None) -> str | None:
    """The id as given, without characters outside `[A-Za-z0-9._:-]` and cut to `MAX_LENGTH`; None if nothing is
    left (a log line never carries a client's newline, quote or escape sequence)."""
    return _UNSAFE.sub("", raw or "")[:MAX_LENGTH] or None


def new_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = sanitize(Headers(scope=scope).get(HEADER)) or new_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (None outside a request) and `record.request_tag` (" [id]" or "")."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True
