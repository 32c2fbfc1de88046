"""The one request timer (lmfleet.metrics.RequestTimer), on its own: what it records for an answer, for a request
that ended with nothing sent (the client left) and for an app that raised, into every sink alike."""

from __future__ import annotations

import pytest
from starlette.types import Message, Receive, Scope, Send

from lmfleet.metrics import OTHER_ROUTE, RequestTimer, TimedRequest


class Recorder:
    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.done: list[TimedRequest] = []

    def request_started(self, route: str, method: str) -> None:
        self.started.append((route, method))

    def request_done(self, request: TimedRequest) -> None:
        self.done.append(request)


async def answers(scope: Scope, receive: Receive, send: Send) -> None:
    scope["lmfleet.model"] = "m"
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"a", "more_body": True})
    await send({"type": "http.response.body", "body": b"b"})


async def says_nothing(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()  # the client hangs up mid-upload: nobody to answer


async def raises(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug")


async def raises_mid_answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    raise RuntimeError("a bug")


async def timed(app: object) -> tuple[Recorder, Recorder]:
    sinks = Recorder(), Recorder()
    timer = RequestTimer(app, routes=[], sinks=sinks)  # type: ignore[arg-type]

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    try:
        await timer(scope, receive, send)
    except RuntimeError:
        pass
    return sinks


@pytest.mark.parametrize(
    ("app", "status", "model", "first_byte"),
    [
        (answers, 201, "m", True),
        (says_nothing, 499, "", False),
        (raises, 500, "", False),
        (raises_mid_answer, 200, "", False),
    ],
    ids=["answered", "client-left", "raised", "raised-after-the-start"],
)
async def test_every_sink_records_the_request_alike(app: object, status: int, model: str, first_byte: bool) -> None:
    one, two = await timed(app)
    assert one.started == two.started == [(OTHER_ROUTE, "POST")]
    assert one.done == two.done and len(one.done) == 1
    (request,) = one.done
    assert (request.route, request.method, request.model, request.status) == (OTHER_ROUTE, "POST", model, status)
    assert request.duration_s >= 0 and (request.first_byte_s is not None) == first_byte
