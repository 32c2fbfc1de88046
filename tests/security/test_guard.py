"""Bodies that are not one sane JSON object are a clear 400 on every process, before any route or model sees them;
bodies over the limit are a 413; everything else reaches the route byte for byte."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from lmfleet import errors
from lmfleet.controller.app import ControllerSettings
from lmfleet.controller.app import create_app as create_controller
from lmfleet.guard import RequestGuard, check_json
from lmfleet.worker.app import WorkerSettings
from lmfleet.worker.app import create_app as create_worker
from tests.api.fakes import assert_error, serve
from tests.fakes import ScriptedEngine, loaded, running

CHAT = b'{"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}'
JSON = {"content-type": "application/json"}

# (raw body, words the error message must contain)
BAD_BODIES = [
    pytest.param(b'{"model": "echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8", id="bad-utf8"),
    pytest.param(CHAT.decode().encode("utf-16"), "UTF-8", id="utf16"),
    pytest.param(b'{"model": "echo", "model": "other", "messages": []}', "more than once", id="dup-top"),
    pytest.param(
        b'{"model": "echo", "messages": [{"role": "user", "role": "system", "content": "x"}]}',
        "more than once",
        id="dup-nested",
    ),
    pytest.param(b'{"model": "echo", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper", id="deep-40"),
    pytest.param(b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests deeper", id="deep-100000"),
    pytest.param(b'{"x": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", "nests deeper", id="deep-objects"),
    pytest.param(b"[1, 2]", "must be a JSON object", id="array"),
    pytest.param(b'"hello"', "must be a JSON object", id="string"),
    pytest.param(b"null", "must be a JSON object", id="null"),
    pytest.param(b"12", "must be a JSON object", id="number"),
    pytest.param(b'{"model": "echo", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate", id="lone"),
    pytest.param(b'{"model": "echo", "seed": ' + b"9" * 5000 + b"}", "digits", id="huge-int"),
    pytest.param(b'{"model": "echo", "messages": [', "not valid JSON", id="truncated"),
    pytest.param(b"{'model': 'echo'}", "not valid JSON", id="single-quotes"),
]


@pytest.mark.parametrize(("body", "says"), BAD_BODIES)
def test_check_json_refuses(body: bytes, says: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        check_json(body)
    assert says in info.value.message
    assert info.value.status == 400


def test_check_json_accepts_what_json_allows() -> None:
    assert check_json(b"\xef\xbb\xbf" + CHAT)["model"] == "echo"  # a UTF-8 BOM is tolerated
    pair = check_json(b'{"t": "\\ud83d\\ude42", "lit": "\\\\ud800"}')  # a surrogate pair; an escaped backslash
    assert pair == {"t": "\U0001f642", "lit": "\\ud800"}
    nested = b'{"a": ' * 31 + b"[1]" + b"}" * 31
    assert check_json(nested, max_depth=32)  # 32 levels: 31 objects and a list
    with pytest.raises(errors.InvalidRequest):
        check_json(b'{"b": ' + nested + b"}", max_depth=32)
    assert check_json(b'{"x": NaN}')  # left to the models, which name the parameter (see test_limits)


@pytest.mark.parametrize(("body", "says"), BAD_BODIES)
async def test_api_refuses_before_any_worker_is_asked(body: bytes, says: str) -> None:
    async with serve() as api:
        for route in ("/v1/chat/completions", "/v1/completions", "/"):
            resp = await api.raw.post(route, content=body, headers={"content-type": "application/json"})
            err = assert_error(resp, 400, type_="invalid_request_error")
            assert says in err["message"]
        assert api.fleet.workers["a"].requests == []


async def test_api_passes_sane_bodies_through_unchanged() -> None:
    async with serve() as api:
        body = b'{"model": "echo", "messages": [{"role": "user", "content": "smile \\ud83d\\ude42 now"}]}'
        resp = await api.raw.post("/v1/chat/completions", content=b"\xef\xbb\xbf" + body, headers=JSON)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "smile \U0001f642 now"
        # no Content-Type at all: checked too (FastAPI parses such bodies when not in strict content-type mode)
        resp = await api.raw.post("/v1/chat/completions", content=b'{"model": "echo", "model": "x"}')
        assert "more than once" in assert_error(resp, 400)["message"]
        # a non-JSON content type is not parsed (the route refuses it as not an object)
        resp = await api.raw.post("/v1/chat/completions", content=CHAT, headers={"content-type": "text/plain"})
        assert "application/json" in assert_error(resp, 400)["message"]


async def test_api_body_limit_counts_declared_and_streamed_bodies() -> None:
    async with serve(max_request_bytes=len(CHAT)) as api:
        resp = await api.raw.post("/v1/chat/completions", content=CHAT, headers=JSON)
        assert resp.status_code == 200  # exactly the limit
        too_big = CHAT[:-1] + b" }"
        assert_error(await api.raw.post("/v1/chat/completions", content=too_big, headers=JSON), 413)

        async def chunked() -> AsyncIterator[bytes]:
            yield too_big[:10]
            yield too_big[10:]

        assert_error(await api.raw.post("/v1/chat/completions", content=chunked(), headers=JSON), 413)
        assert len(api.fleet.workers["a"].requests) == 1


@contextlib.asynccontextmanager
async def started_controller() -> AsyncIterator[httpx.AsyncClient]:
    app = create_controller(ControllerSettings(max_request_bytes=4096))
    async with running(app) as (asgi, _):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://controller") as c:
            yield c


@contextlib.asynccontextmanager
async def started_worker(max_request_bytes: int = 4096) -> AsyncIterator[httpx.AsyncClient]:
    settings = WorkerSettings(
        model_path="fake", worker_address="http://worker", controller_addresses=[], max_request_bytes=max_request_bytes
    )
    app = create_worker(settings, load=lambda _s: loaded(ScriptedEngine()))
    async with running(app) as (asgi, _):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://worker") as c:
            yield c


@pytest.mark.parametrize(("body", "says"), BAD_BODIES[:4] + BAD_BODIES[5:])  # the 100000-deep one is over 4 KiB
async def test_controller_and_worker_refuse_the_same_bodies(body: bytes, says: str) -> None:
    async with started_controller() as controller, started_worker() as worker:
        for client, route in (
            (controller, "/register_worker"),
            (controller, "/receive_heart_beat"),
            (controller, "/get_worker_address"),
            (worker, "/worker/generate"),
        ):
            resp = await client.post(route, content=body, headers={"content-type": "application/json"})
            if len(body) > 4096:
                assert_error(resp, 413)
            else:
                assert says in assert_error(resp, 400)["message"], route
        assert (await controller.get("/workers")).json() == {"workers": []}
        assert_error(await worker.post("/worker/generate", content=b"{" + b" " * 5000 + b"}"), 413)
        assert_error(await controller.post("/register_worker", content=b"{" + b" " * 5000 + b"}"), 413)


async def test_guard_replays_the_body_then_passes_the_disconnect_on() -> None:
    seen: list[dict] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    inbox = [
        {"type": "http.request", "body": CHAT[:5], "more_body": True},
        {"type": "http.request", "body": CHAT[5:], "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return inbox.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]}
    await RequestGuard(app, max_bytes=1000)(scope, receive, send)
    assert seen == [{"type": "http.request", "body": CHAT, "more_body": False}, {"type": "http.disconnect"}]
    assert sent[0]["status"] == 204

    # a client that goes away half-way through its body: the app is never called, nothing is answered
    seen.clear()
    sent.clear()
    inbox[:] = [{"type": "http.request", "body": CHAT[:5], "more_body": True}, {"type": "http.disconnect"}]
    await RequestGuard(app, max_bytes=1000)(scope, receive, send)
    assert seen == [] and sent == []


async def test_refusals_are_json_with_the_openai_shape() -> None:
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        raise AssertionError("the app must not be called")

    async def receive() -> dict:
        return {"type": "http.request", "body": b"[1]", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    await RequestGuard(app)(scope, receive, send)
    assert sent[0]["status"] == 400
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
