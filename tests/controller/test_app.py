"""The controller over HTTP, in process: `create_app` behind `httpx.ASGITransport`, a fake clock, fake workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from lmfleet import errors
from lmfleet.client import ControllerClient
from lmfleet.controller.app import ControllerSettings, create_app
from lmfleet.protocol.worker import WorkerStatus
from tests.fakes import running

BASE = "http://controller"
W1 = "http://127.0.0.1:31001"
W2 = "http://127.0.0.1:31002"
SECRET = "s3cret-value-never-logged"


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def controller(
    settings: ControllerSettings | None = None, *, clock: FakeClock | None = None, http_client=None, app=None
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeClock]]:
    """A started controller (lifespan run) and an HTTP client for it."""
    clock = clock or FakeClock()
    app = app or create_app(settings or ControllerSettings(), clock=clock, http_client=http_client)
    async with running(app) as (asgi, _):
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            yield client, clock


def reg_body(address: str, *models: str, protocol: str | None = "lmfleet", **status) -> dict:
    """An lmfleet worker's registration; with `protocol=None`, a FastChat worker's (its status names no protocol)."""
    status = {"model_names": list(models), **status, **({"protocol": protocol} if protocol else {})}
    return {"worker_name": address, "check_heart_beat": True, "worker_status": status}


def auth(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_error(resp: httpx.Response, status: int, *, type_: str = "invalid_request_error") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_ and body["error"]["message"]
    return body["error"]


async def addresses(client: httpx.AsyncClient) -> list[str]:
    resp = await client.get("/workers")
    assert resp.status_code == 200
    return [w["address"] for w in resp.json()["workers"]]


async def test_register_heartbeat_expire() -> None:
    async with controller() as (c, clock):
        resp = await c.post("/register_worker", json=reg_body(W1 + "/", "m", queue_length=2))
        assert resp.status_code == 200
        assert resp.json()["address"] == W1  # trailing slash normalized away
        assert await addresses(c) == [W1]
        (info,) = (await c.get("/workers")).json()["workers"]
        assert info["status"]["model_names"] == ["m"] and info["status"]["queue_length"] == 2

        clock.now += 4.0
        resp = await c.post("/receive_heart_beat", json={"worker_name": W1, "queue_length": 0})
        assert resp.json() == {"exist": True}
        clock.now += 4.0  # 8 s after registering, 4 s after the heartbeat: alive
        assert (await c.get("/list_models")).json() == {"models": ["m"]}

        clock.now += 2.5  # 6.5 s without a heartbeat
        assert (await c.post("/list_models")).json() == {"models": []}
        assert await addresses(c) == []
        assert (await c.post("/get_worker_address", json={"model": "m"})).json() == {"address": ""}
        resp = await c.post("/receive_heart_beat", json={"worker_name": W1, "queue_length": 0})
        assert resp.json() == {"exist": False}
        assert await addresses(c) == []  # an unknown worker's heartbeat does not add it


async def test_worker_re_registers_after_controller_restart() -> None:
    status = WorkerStatus(model_names=["m"])
    async with controller() as (c, _):
        worker_side = ControllerClient(c, BASE)
        await worker_side.register(W1, status)
        assert await worker_side.heartbeat(W1, status) is True
    async with controller() as (c, _):  # a fresh controller knows nobody
        worker_side = ControllerClient(c, BASE)
        assert await worker_side.heartbeat(W1, status) is False
        assert await worker_side.workers() == []
        await worker_side.register(W1, status)
        assert await worker_side.heartbeat(W1, status) is True
        assert [w.address for w in await worker_side.workers()] == [W1]
        await worker_side.unregister(W1)
        assert await worker_side.workers() == []
        assert await worker_side.heartbeat(W1, status) is False


async def test_list_models_across_workers_and_addresses_per_model() -> None:
    async with controller() as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "llama"))
        await c.post("/register_worker", json=reg_body(W2, "qwen", "llama"))
        assert (await c.get("/list_models")).json() == {"models": ["llama", "qwen"]}
        assert (await c.post("/get_worker_address", json={"model": "qwen"})).json() == {"address": W2}
        assert (await c.post("/get_worker_address", json={"model": "nope"})).json() == {"address": ""}
        # Re-registering replaces what the address serves.
        await c.post("/register_worker", json=reg_body(W2, "mistral"))
        assert (await c.get("/list_models")).json() == {"models": ["llama", "mistral"]}


def on_demand(loaded: str | None = None, **status) -> dict:
    """A worker that can load m1, m2 and m3, holding `loaded` (if any)."""
    models = [
        {"name": m, "state": "loaded" if m == loaded else "unloaded", "memory_bytes": 1 << 30 if m == loaded else 0}
        for m in ("m1", "m2", "m3")
    ]
    return {"models": models, "memory_budget_bytes": 8 << 30, **status}


async def test_workers_that_load_on_demand_list_every_model_and_dispatch_prefers_the_holder() -> None:
    async with controller() as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "m1", "m2", "m3", **on_demand("m1")))
        await c.post("/register_worker", json=reg_body(W2, "m1", "m2", "m3", **on_demand("m2")))
        assert (await c.get("/list_models")).json() == {"models": ["m1", "m2", "m3"]}  # unloaded ones too
        (listed,) = [w for w in (await c.get("/workers")).json()["workers"] if w["address"] == W1]
        assert WorkerStatus.model_validate(listed["status"]) == WorkerStatus.model_validate(
            reg_body(W1, "m1", "m2", "m3", **on_demand("m1"))["worker_status"]
        )  # the models' states and the budget travel through the registry
        for _ in range(10):  # W1 holds m1, though W2 is less loaded
            assert (await c.post("/get_worker_address", json={"model": "m1"})).json() == {"address": W1}
        evicted = reg_body(W1, "m1", "m2", "m3", **on_demand("m2"))["worker_status"]  # W1 evicted m1 for m2
        await c.post("/receive_heart_beat", json={"worker_name": W1, "worker_status": evicted})
        picks = {(await c.post("/get_worker_address", json={"model": "m1"})).json()["address"] for _ in range(10)}
        assert len(picks) == 1  # nobody holds it: one worker is chosen to load it


async def test_shortest_queue_sends_to_the_least_loaded_and_follows_heartbeats() -> None:
    async with controller() as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "m", queue_length=5))
        await c.post("/register_worker", json=reg_body(W2, "m", queue_length=1))
        for _ in range(10):
            assert (await c.post("/get_worker_address", json={"model": "m"})).json() == {"address": W2}
        await c.post("/receive_heart_beat", json={"worker_name": W2, "queue_length": 9})
        for _ in range(10):
            assert (await c.post("/get_worker_address", json={"model": "m"})).json() == {"address": W1}


async def test_lottery_policy_is_selectable_by_name() -> None:
    async with controller(ControllerSettings(dispatch_policy="lottery")) as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "m", speed=1.0))
        await c.post("/register_worker", json=reg_body(W2, "m", speed=1.0, queue_length=100))
        seen = {(await c.post("/get_worker_address", json={"model": "m"})).json()["address"] for _ in range(60)}
        assert seen == {W1, W2}  # the lottery ignores load


async def test_registration_secret_required(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with controller(ControllerSettings(registration_secret=SECRET)) as (c, _):
        for headers in ({}, auth("wrong"), {"Authorization": SECRET}, {"Authorization": f"Basic {SECRET}"}):
            err = assert_error(await c.post("/register_worker", json=reg_body(W1, "m"), headers=headers), 401)
            assert err["code"] == "invalid_api_key" and SECRET not in err["message"]
        assert await addresses(c) == []
        assert (await c.get("/list_models")).json() == {"models": []}

        assert (await c.post("/register_worker", json=reg_body(W1, "m"), headers=auth())).status_code == 200
        assert_error(await c.post("/receive_heart_beat", json={"worker_name": W1}), 401)
        assert_error(await c.post("/unregister_worker", json={"worker_name": W1}), 401)
        assert await addresses(c) == [W1]
        resp = await c.post("/receive_heart_beat", json={"worker_name": W1}, headers=auth())
        assert resp.json() == {"exist": True}

        # Read routes stay open, with or without the header.
        for headers in ({}, auth()):
            assert (await c.get("/list_models", headers=headers)).json() == {"models": ["m"]}
            assert (await c.post("/get_worker_address", json={"model": "m"}, headers=headers)).json() == {"address": W1}
            assert (await c.get("/health", headers=headers)).json() == {"status": "ok"}
            assert (await c.get("/ready", headers=headers)).json() == {"status": "ready"}  # memory is never stale

        assert (await c.post("/unregister_worker", json={"worker_name": W1}, headers=auth())).json() == {
            "removed": True
        }
        assert await addresses(c) == []
    assert any("registration secret" in r.getMessage() for r in caplog.records)
    assert not any(SECRET in r.getMessage() for r in caplog.records)


async def test_controller_client_sends_the_secret() -> None:
    async with controller(ControllerSettings(registration_secret=SECRET)) as (c, _):
        with pytest.raises(errors.AuthenticationFailed):
            await ControllerClient(c, BASE).register(W1, WorkerStatus(model_names=["m"]))
        await ControllerClient(c, BASE, secret=SECRET).register(W1, WorkerStatus(model_names=["m"]))
        assert await addresses(c) == [W1]


@pytest.mark.parametrize(
    ("networks", "address", "allowed"),
    [
        (["10.0.0.0/8"], "http://10.1.2.3:21002", True),
        (["10.0.0.0/8"], "http://192.168.1.5:21002", False),
        (["10.0.0.0/8"], "http://worker.internal:21002", False),  # hostnames are never resolved
        (["10.0.0.0/8"], "http://localhost:21002", False),
        (["127.0.0.0/8"], "http://localhost:21002", True),
        (["127.0.0.0/8"], "http://127.0.0.1:21002", True),
        (["10.0.0.0/8"], "http://[::ffff:10.0.0.7]:21002", True),
        (["fd00::/8"], "http://[fd00::1]:21002", True),
        (["fd00::/8", "10.0.0.0/8"], "http://[fe80::1]:21002", False),
        ([], "http://127.0.0.1:21002", False),
    ],
)
async def test_allowed_worker_networks(networks: list[str], address: str, allowed: bool) -> None:
    async with controller(ControllerSettings(allowed_worker_networks=networks)) as (c, _):
        resp = await c.post("/register_worker", json=reg_body(address, "m"))
        if allowed:
            assert resp.status_code == 200, resp.text
            assert (await c.get("/list_models")).json() == {"models": ["m"]}
        else:
            err = assert_error(resp, 403)
            assert err["code"] == "forbidden" and err["param"] == "worker_name"
            assert await addresses(c) == []


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/register_worker", "{not json", None),
        ("/register_worker", "[1, 2]", None),
        ("/register_worker", {}, "worker_name"),
        ("/register_worker", {"worker_name": 5, "worker_status": {"model_names": ["m"]}}, "worker_name"),
        ("/register_worker", reg_body(W1), "worker_status.model_names"),
        ("/register_worker", reg_body(W1, "m", speed=-1), "worker_status.speed"),
        ("/register_worker", reg_body(W1, "m", speed=0), "worker_status.speed"),
        ("/register_worker", reg_body(W1, "m", queue_length=-3), "worker_status.queue_length"),
        (
            "/register_worker",
            '{"worker_name": "http://h:1", "worker_status": {"model_names": ["m"], "speed": 1e999}}',
            "worker_status.speed",
        ),
        (
            "/register_worker",
            '{"worker_name": "http://h:1", "worker_status": {"model_names": ["m"], "speed": NaN}}',
            "worker_status.speed",
        ),
        ("/register_worker", reg_body("ftp://127.0.0.1:1", "m"), "worker_name"),
        ("/register_worker", reg_body("127.0.0.1:21002", "m"), "worker_name"),
        ("/register_worker", reg_body("http://:21002", "m"), "worker_name"),
        ("/register_worker", reg_body("http://127.0.0.1:99999", "m"), "worker_name"),
        ("/register_worker", reg_body("http://user:pw@127.0.0.1:1", "m"), "worker_name"),
        ("/register_worker", reg_body("http://127.0.0.1:1/?x=1", "m"), "worker_name"),
        ("/register_worker", reg_body("http://127.0.0.1 :1", "m"), "worker_name"),
        ("/receive_heart_beat", {"worker_name": W1, "queue_length": -1}, "queue_length"),
        ("/receive_heart_beat", {"worker_name": "not a url"}, "worker_name"),
        ("/unregister_worker", {}, "worker_name"),
        ("/get_worker_address", {}, "model"),
        ("/get_worker_address", {"model": ["m"]}, "model"),
    ],
)
async def test_bad_bodies_are_openai_shaped_400s(route: str, body, param: str | None) -> None:
    async with controller() as (c, _):
        if isinstance(body, str):
            resp = await c.post(route, content=body, headers={"Content-Type": "application/json"})
        else:
            resp = await c.post(route, json=body)
        err = assert_error(resp, 400)
        assert err["param"] == param
        assert await addresses(c) == []


async def test_unknown_routes_and_methods_are_openai_shaped() -> None:
    async with controller() as (c, _):
        assert_error(await c.get("/nope"), 404)
        assert_error(await c.get("/register_worker"), 405)


def fake_fastchat_worker(status: dict | None, *, http_status: int = 200) -> tuple[FastAPI, list[int]]:
    """A FastChat model worker as far as the controller sees it: `POST /worker_get_status`."""
    app = FastAPI()
    calls: list[int] = []

    @app.post("/worker_get_status")
    async def worker_get_status():
        calls.append(1)
        from fastapi.responses import JSONResponse

        return JSONResponse(status, status_code=http_status)

    return app, calls


FASTCHAT_REGISTRATION = {"worker_name": W2, "check_heart_beat": True, "worker_status": None, "multimodal": False}


async def test_fastchat_registration_fetches_the_status_from_the_worker() -> None:
    fake, calls = fake_fastchat_worker({"model_names": ["vicuna-7b"], "speed": 1, "queue_length": 2})
    async with (
        httpx.AsyncClient(mounts={W2: httpx.ASGITransport(app=fake)}) as http,
        controller(http_client=http) as (c, _),
    ):
        resp = await c.post("/register_worker", json=FASTCHAT_REGISTRATION)
        assert resp.status_code == 200, resp.text
        assert calls == [1]
        assert (await c.post("/list_models")).json() == {"models": ["vicuna-7b"]}
        (info,) = (await c.get("/workers")).json()["workers"]
        assert info["status"]["queue_length"] == 2
        # FastChat's heartbeat: queue length only.
        resp = await c.post("/receive_heart_beat", json={"worker_name": W2, "queue_length": 4})
        assert resp.json() == {"exist": True}
        assert (await c.get("/workers")).json()["workers"][0]["status"]["queue_length"] == 4
        assert (await c.post("/get_worker_address", json={"model": "vicuna-7b"})).json() == {"address": W2}


async def test_status_is_not_fetched_for_unauthenticated_or_disallowed_callers() -> None:
    fake, calls = fake_fastchat_worker({"model_names": ["vicuna-7b"]})
    async with httpx.AsyncClient(mounts={W2: httpx.ASGITransport(app=fake)}) as http:
        async with controller(ControllerSettings(registration_secret=SECRET), http_client=http) as (c, _):
            assert_error(await c.post("/register_worker", json=FASTCHAT_REGISTRATION), 401)
        async with controller(ControllerSettings(allowed_worker_networks=["10.0.0.0/8"]), http_client=http) as (c, _):
            assert_error(await c.post("/register_worker", json=FASTCHAT_REGISTRATION), 403)
        assert calls == []
        async with controller(ControllerSettings(registration_secret=SECRET), http_client=http) as (c, _):
            resp = await c.post("/register_worker", json=FASTCHAT_REGISTRATION, headers=auth())
            assert resp.status_code == 200 and calls == [1]


@pytest.mark.parametrize(
    ("status", "http_status"),
    [({"error": "boom"}, 500), ({"speed": 1}, 200), ({"model_names": []}, 200), (None, 404)],
)
async def test_a_failing_status_fetch_is_a_clear_400(status, http_status: int) -> None:
    fake, _ = fake_fastchat_worker(status, http_status=http_status)
    async with (
        httpx.AsyncClient(mounts={W2: httpx.ASGITransport(app=fake)}) as http,
        controller(http_client=http) as (c, _),
    ):
        err = assert_error(await c.post("/register_worker", json=FASTCHAT_REGISTRATION), 400)
        assert err["param"] == "worker_status" and "worker_get_status" in err["message"]
        assert await addresses(c) == []


async def test_an_unreachable_worker_status_fetch_is_a_clear_400() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http,
        controller(http_client=http) as (c, _),
    ):
        err = assert_error(await c.post("/register_worker", json=FASTCHAT_REGISTRATION), 400)
        assert "ConnectError" in err["message"]


async def test_refresh_all_workers_and_the_background_sweep_expire(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmfleet.controller")
    clock = FakeClock()
    async with controller(clock=clock) as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "m"))
        clock.now += 7.0
        assert (await c.post("/refresh_all_workers")).json() == {"removed": [W1]}
        assert any("registered worker" in r.getMessage() for r in caplog.records)
        assert any("expired worker" in r.getMessage() for r in caplog.records)

    # With no request arriving at all, the lifespan's sweep expires the worker on its own.
    caplog.clear()
    app = create_app(ControllerSettings(heartbeat_expiry_s=0.02), clock=clock)
    async with controller(app=app) as (c, _):
        await c.post("/register_worker", json=reg_body(W1, "m"))
        clock.now += 1.0
        for _ in range(500):
            if any("expired worker" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        assert any(f"expired worker {W1}" in r.getMessage() for r in caplog.records)


def test_settings_are_validated_and_never_show_the_secret() -> None:
    for bad in (
        {"dispatch_policy": "round_robin"},
        {"heartbeat_expiry_s": 0},
        {"registration_secret": ""},
        {"allowed_worker_networks": ["10.0.0.0/33"]},
        {"allowed_worker_networks": ["example.com"]},
    ):
        with pytest.raises(ValueError):
            ControllerSettings(**bad)
    settings = ControllerSettings(registration_secret=SECRET)
    assert SECRET not in repr(settings) and SECRET not in str(settings)


def test_importing_the_controller_does_not_import_torch() -> None:
    code = "import lmfleet.controller.app, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
