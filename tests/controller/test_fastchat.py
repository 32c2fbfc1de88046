"""The controller's FastChat side: what FastChat's model workers, API server and Gradio web server call, in process.

A FastChat worker is told apart by its status (no protocol named) and lives out FastChat's own 90 s expiry; the
routes FastChat's servers call answer in FastChat's shapes; `/worker_generate_stream` relays a worker's NUL-separated
objects and says a failure in-band."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lmfleet.controller.app import ControllerSettings
from tests.controller.test_app import SECRET, W1, W2, FakeClock, addresses, auth, controller, reg_body

OBJECTS = [{"text": "He", "error_code": 0}, {"text": "Hello", "error_code": 0, "finish_reason": "stop"}]


def fastchat_worker(seen: list[dict]) -> FastAPI:
    """A worker's `/worker_generate_stream`: two cumulative objects, each followed by a NUL byte, sent in pieces
    that cut through them."""
    app = FastAPI()

    @app.post("/worker_generate_stream")
    async def generate(body: dict) -> StreamingResponse:
        seen.append(body)
        raw = b"".join(json.dumps(o).encode() + b"\0" for o in OBJECTS)
        return StreamingResponse(iter([raw[:5], raw[5:30], raw[30:]]))

    return app


async def objects(resp: httpx.Response) -> list[dict]:
    raw = await resp.aread()
    assert raw.endswith(b"\0")
    return [json.loads(part) for part in raw.split(b"\0") if part]


async def test_a_fastchat_registration_gets_fastchats_expiry_and_protocol() -> None:
    clock = FakeClock()
    async with controller(clock=clock) as (c, _):
        assert (await c.post("/register_worker", json=reg_body(W1, "m", protocol=None))).is_success
        assert (await c.post("/register_worker", json=reg_body(W2, "m"))).is_success
        protocols = {w["address"]: w["status"]["protocol"] for w in (await c.get("/workers")).json()["workers"]}
        assert protocols == {W1: "fastchat", W2: "lmfleet"}
        clock.now += 45.0  # one FastChat heartbeat interval: the lmfleet worker (6 s) is gone, the FastChat one not
        assert await addresses(c) == [W1]
        assert (await c.post("/receive_heart_beat", json={"worker_name": W1, "queue_length": 1})).json()["exist"]
        clock.now += 89.0
        assert await addresses(c) == [W1]
        clock.now += 2.0
        assert await addresses(c) == []


async def test_the_fastchat_expiry_is_a_setting() -> None:
    clock = FakeClock()
    async with controller(ControllerSettings(fastchat_heartbeat_expiry_s=10), clock=clock) as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "m", protocol=None))
        clock.now += 10.5
        assert await addresses(c) == []


async def test_the_routes_fastchats_api_and_gradio_servers_call() -> None:
    async with controller() as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "text", protocol=None, queue_length=2))
        multimodal = {**reg_body(W2, "vision", protocol=None, speed=2), "multimodal": True}
        await c.post("/register_worker", json=multimodal)
        assert (await c.post("/refresh_all_workers")).status_code == 200
        assert (await c.post("/list_models")).json() == {"models": ["text", "vision"]}
        assert (await c.post("/list_language_models")).json() == {"models": ["text"]}
        assert (await c.post("/list_multimodal_models")).json() == {"models": ["vision"]}
        assert (await c.post("/worker_get_status")).json() == {
            "model_names": ["text", "vision"],
            "speed": 3.0,
            "queue_length": 2,
        }
        assert (await c.get("/test_connection")).json() == "success"
        assert (await c.post("/get_worker_address", json={"model": "text"})).json() == {"address": W1}
        assert (await c.post("/get_worker_address", json={"model": "nope"})).json() == {"address": ""}


async def test_worker_generate_stream_relays_the_workers_objects() -> None:
    seen: list[dict] = []
    async with (
        httpx.AsyncClient(mounts={W1: httpx.ASGITransport(app=fastchat_worker(seen))}) as http,
        controller(http_client=http) as (c, _),
    ):
        await c.post("/register_worker", json=reg_body(W1, "m", protocol=None))
        params = {"model": "m", "prompt": "Hi", "max_new_tokens": 8, "echo": False}
        assert await objects(await c.post("/worker_generate_stream", json=params)) == OBJECTS
        assert seen == [params]
        # no worker for the model: FastChat's in-band answer
        (answer,) = await objects(await c.post("/worker_generate_stream", json={**params, "model": "other"}))
        assert answer["error_code"] == 50005


@pytest.mark.parametrize("failure", ["refused", "http_500"])
async def test_a_worker_failing_the_relay_is_an_in_band_error(failure: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        if failure == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(500, text="Internal Server Error")

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(fail)) as http,
        controller(http_client=http) as (c, _),
    ):
        await c.post("/register_worker", json=reg_body(W1, "m", protocol=None))
        (answer,) = await objects(await c.post("/worker_generate_stream", json={"model": "m", "prompt": "Hi"}))
        assert answer["error_code"] == 50006 and answer["text"]


async def test_the_relay_takes_the_fleet_secret_and_passes_it_on() -> None:
    seen: list[dict] = []
    headers: list[str | None] = []

    def record(request: httpx.Request) -> None:
        headers.append(request.headers.get("authorization"))

    async with (
        httpx.AsyncClient(
            mounts={W1: httpx.ASGITransport(app=fastchat_worker(seen))}, event_hooks={"request": [_hook(record)]}
        ) as http,
        controller(ControllerSettings(registration_secret=SECRET), http_client=http) as (c, _),
    ):
        await c.post("/register_worker", json=reg_body(W1, "m", protocol=None), headers=auth())
        assert (await c.post("/worker_generate_stream", json={"model": "m", "prompt": "Hi"})).status_code == 401
        assert seen == []
        resp = await c.post("/worker_generate_stream", json={"model": "m", "prompt": "Hi"}, headers=auth())
        assert await objects(resp) == OBJECTS
        assert headers == [f"Bearer {SECRET}"]  # the workers take the same fleet secret


def _hook(record):
    async def hook(request: httpx.Request) -> None:
        record(request)

    return hook
