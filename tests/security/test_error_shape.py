"""Every error, from every process, has exactly `{"error": {"message", "type", "param", "code"}}`; a 405 says what
is allowed; and a 500 (a bug) says nothing about the inside: no traceback, no exception text, no path."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from lmfleet.api.app import ApiSettings
from lmfleet.api.app import create_app as create_api
from lmfleet.controller.app import ControllerSettings
from lmfleet.controller.app import create_app as create_controller
from lmfleet.worker.app import WorkerSettings
from lmfleet.worker.app import create_app as create_worker
from tests.api.fakes import CONTROLLER, Fleet, assert_error, serve
from tests.fakes import ScriptedEngine, loaded, running

INTERNAL = "SECRET-INTERNAL-DETAIL /srv/lmfleet/secret_module.py line 42"


def _apps(fleet: Fleet) -> dict[str, FastAPI]:
    worker = WorkerSettings(model_path="fake", worker_address="http://worker", controller_addresses=[])
    return {
        "api": create_api(ApiSettings(controller_address=CONTROLLER), http_client=fleet.http_client()),
        "controller": create_controller(ControllerSettings()),
        "worker": create_worker(worker, load=lambda _s: loaded(ScriptedEngine())),
    }


@contextlib.asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as (asgi, _):
        transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.mark.parametrize("part", ["api", "controller", "worker"])
async def test_a_bug_is_a_bare_500(part: str, caplog: pytest.LogCaptureFixture) -> None:
    app = _apps(Fleet())[part]

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(INTERNAL)

    @app.post("/boom-body")
    async def boom_body(body: dict) -> None:
        raise KeyError(INTERNAL)

    async with started(app) as client:
        for resp in (await client.get("/boom"), await client.post("/boom-body", json={"a": 1})):
            err = assert_error(resp, 500, type_="internal_error")
            assert err == {"message": "internal server error", "type": "internal_error", "param": None, "code": None}
            for leak in ("SECRET-INTERNAL", "Traceback", "RuntimeError", "KeyError", ".py"):
                assert leak not in resp.text
    assert any(INTERNAL in (r.exc_text or "") for r in caplog.records)  # the operator still gets the traceback


@pytest.mark.parametrize("part", ["api", "controller", "worker"])
async def test_404_and_405_on_every_process(part: str) -> None:
    async with started(_apps(Fleet())[part]) as client:
        assert_error(await client.get("/no/such/route"), 404)
        assert_error(await client.post("/no/such/route", json={}), 404)
        resp = await client.delete("/health")
        assert_error(resp, 405)
        assert resp.headers["allow"] == "GET"


async def test_api_405_names_the_allowed_methods() -> None:
    async with serve() as api:
        resp = await api.raw.get("/v1/chat/completions")
        assert_error(resp, 405)
        assert resp.headers["allow"] == "POST"
        resp = await api.raw.put("/v1/models")
        assert_error(resp, 405)
        assert resp.headers["allow"] == "GET"


async def test_no_worker_and_no_controller_are_shaped_503s() -> None:
    async with serve(Fleet({"echo": ["a"]}), controller_address="http://nowhere.test") as api:
        empty = {"model": "echo", "messages": []}  # bad input is refused before the controller is needed
        assert_error(await api.raw.post("/v1/chat/completions", json=empty), 400, param="messages")
        resp = await api.raw.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert_error(resp, 503, type_="service_unavailable_error")
        assert_error(await api.raw.get("/v1/models"), 503)


async def test_errors_are_json_even_when_the_client_asks_for_html() -> None:
    async with serve(api_keys=["sk-k"]) as api:
        html = {"Accept": "text/html"}
        assert_error(await api.raw.get("/v1/models", headers=html), 401)
        auth = {**html, "Authorization": "Bearer sk-k"}
        assert_error(await api.raw.get("/nothing", headers=auth), 404)
        assert_error(await api.raw.post("/v1/completions", content=b"\xff", headers=auth), 400)
        assert_error(await api.raw.post("/v1/completions", json={"prompt": "p", "n": 99}, headers=auth), 400, param="n")
