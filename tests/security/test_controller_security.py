"""The controller against hostile callers: with a registration secret, nobody without it can add, refresh, reload
or remove a worker, or make the controller connect anywhere; and no load report, however extreme, breaks
dispatch for the others. (The basic 401/403 paths are in tests/controller/test_app.py.)"""

from __future__ import annotations

import logging

import httpx
import pytest

from lmfleet.controller.app import ControllerSettings, create_app
from tests.controller.test_app import FakeClock, addresses, assert_error, auth, controller, reg_body

SECRET = "canary-registration-secret-4d1f"
W1 = "http://127.0.0.1:31001"
W2 = "http://127.0.0.1:31002"

WRONG = [
    {},
    {"Authorization": "Bearer "},
    {"Authorization": f"Bearer {SECRET}x"},
    {"Authorization": f"Bearer {SECRET[:-1]}"},
    {"Authorization": f"Bearer {SECRET.upper()}"},
    {"Authorization": f"Bearer {'x' * len(SECRET)}"},
    {"Authorization": f"Token {SECRET}"},
    {"X-Registration-Secret": SECRET},
]


async def workers(c: httpx.AsyncClient) -> list[dict]:
    return (await c.get("/workers")).json()["workers"]


@pytest.mark.parametrize("headers", WRONG, ids=range(len(WRONG)))
async def test_without_the_secret_nothing_changes(headers: dict[str, str]) -> None:
    clock = FakeClock()
    async with controller(ControllerSettings(registration_secret=SECRET), clock=clock) as (c, _):
        resp = await c.post("/register_worker", json=reg_body(W1, "m", queue_length=3), headers=auth(SECRET))
        assert resp.is_success
        before = await workers(c)

        # no new worker, whether it registers or only heartbeats
        assert_error(await c.post("/register_worker", json=reg_body(W2, "m"), headers=headers), 401)
        assert_error(await c.post("/receive_heart_beat", json={"worker_name": W2}, headers=headers), 401)
        # the known worker's load, models and liveness are not the caller's to change
        fake_idle = {"worker_name": W1, "queue_length": 0, "worker_status": {"model_names": ["other"]}}
        assert_error(await c.post("/receive_heart_beat", json=fake_idle, headers=headers), 401)
        assert_error(await c.post("/register_worker", json=reg_body(W1, "evil", queue_length=0), headers=headers), 401)
        assert_error(await c.post("/unregister_worker", json={"worker_name": W1}, headers=headers), 401)
        assert await workers(c) == before

        clock.now += 7.0  # past the expiry: refused heartbeats kept nothing alive
        assert_error(await c.post("/receive_heart_beat", json={"worker_name": W1}, headers=headers), 401)
        assert await addresses(c) == []
        assert (await c.post("/get_worker_address", json={"model": "m"})).json() == {"address": ""}


async def test_refusals_never_log_or_echo_what_was_presented(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    presented = "canary-presented-wrong-secret-77a0"
    async with controller(ControllerSettings(registration_secret=SECRET)) as (c, _):
        for route, body in (
            ("/register_worker", reg_body(W1, "m")),
            ("/receive_heart_beat", {"worker_name": W1}),
            ("/unregister_worker", {"worker_name": W1}),
        ):
            resp = await c.post(route, json=body, headers=auth(presented))
            assert_error(resp, 401)
            assert presented not in resp.text and SECRET not in resp.text
        assert (await c.post("/register_worker", json=reg_body(W1, "m"), headers=auth(SECRET))).is_success
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "registration secret" in logged  # the refusal is logged...
    assert presented not in logged and SECRET not in logged  # ...without either secret


async def test_unauthenticated_address_is_never_contacted() -> None:
    """Neither a registration without a status (FastChat's, which makes the controller fetch it) nor a heartbeat
    makes the controller open a connection for a caller without the secret, whatever address it names."""
    contacted: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        contacted.append(str(request.url))
        return httpx.Response(200, json={"model_names": ["m"], "speed": 1, "queue_length": 0})

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(record)) as http,
        controller(ControllerSettings(registration_secret=SECRET), http_client=http) as (c, _),
    ):
        for address in (W1, "http://169.254.169.254", "http://10.0.0.1:6379", "http://localhost:22"):
            body = {"worker_name": address, "check_heart_beat": True, "worker_status": None}
            assert_error(await c.post("/register_worker", json=body), 401)
            assert_error(await c.post("/receive_heart_beat", json={"worker_name": address}), 401)
        assert contacted == []
        assert (await c.post("/register_worker", json={"worker_name": W1}, headers=auth(SECRET))).is_success
        assert contacted == [W1 + "/worker_get_status"]


async def test_secret_and_networks_must_both_pass() -> None:
    settings = ControllerSettings(registration_secret=SECRET, allowed_worker_networks=["127.0.0.0/8"])
    async with controller(settings) as (c, _):
        outside = reg_body("http://10.0.0.5:1", "m")
        assert_error(await c.post("/register_worker", json=outside, headers=auth(SECRET)), 403)
        assert_error(await c.post("/register_worker", json=reg_body(W1, "m")), 401)
        assert await addresses(c) == []
        assert (await c.post("/register_worker", json=reg_body(W1, "m"), headers=auth(SECRET))).is_success


@pytest.mark.parametrize(
    ("status", "param"),
    [
        ({"queue_length": -1}, "worker_status.queue_length"),
        ({"running": -5}, "worker_status.running"),
        ({"waiting": -5}, "worker_status.waiting"),
        ({"speed": 0}, "worker_status.speed"),
        ({"speed": -2.5}, "worker_status.speed"),
        ({"speed": 1e300}, "worker_status.speed"),
        ({"queue_length": 10**400}, "worker_status.queue_length"),
        ({"running": 10**400}, "worker_status.running"),
        ({"waiting": 10**400}, "worker_status.waiting"),
        ({"tokens_in_flight": 10**400}, "worker_status.tokens_in_flight"),
        ({"context_length": 0}, "worker_status.context_length"),
        ({"queue_length": "0"}, None),  # lax ints are fine as long as they are in range
        ({"model_names": ["m"] * 300}, "worker_status.model_names"),
        ({"model_names": ["m" * 5000]}, "worker_status.model_names.0"),
        ({"model_names": [""]}, "worker_status.model_names.0"),
    ],
)
async def test_a_load_report_cannot_be_faked_out_of_range(status: dict, param: str | None) -> None:
    async with controller() as (c, _):
        body = reg_body(W1, "m")
        body["worker_status"].update(status)
        resp = await c.post("/register_worker", json=body)
        if param is None:
            assert resp.is_success, resp.text
            return
        assert assert_error(resp, 400)["param"] == param
        assert await addresses(c) == []
        # nor through a heartbeat of an already registered worker
        assert (await c.post("/register_worker", json=reg_body(W2, "m"))).is_success
        beat = {"worker_name": W2, "worker_status": body["worker_status"]}
        assert assert_error(await c.post("/receive_heart_beat", json=beat), 400)["param"] == param
        assert (await workers(c))[0]["status"]["queue_length"] == 0


@pytest.mark.parametrize("policy", ["shortest_queue", "lottery"])
async def test_extreme_but_valid_reports_do_not_break_dispatch(policy: str) -> None:
    """The largest loads and the smallest speed the protocol accepts: every pick still answers, and a worker that
    says it is swamped does not get the traffic."""
    async with controller(ControllerSettings(dispatch_policy=policy)) as (c, _):
        huge = {"queue_length": 10_000_000, "running": 2**40, "waiting": 2**40, "tokens_in_flight": 2**40}
        assert (await c.post("/register_worker", json=reg_body(W1, "m", speed=1e-300, **huge))).is_success
        assert (await c.post("/register_worker", json=reg_body(W2, "m", speed=1_000_000))).is_success
        picks = {(await c.post("/get_worker_address", json={"model": "m"})).json()["address"] for _ in range(40)}
        assert picks <= {W1, W2} and W2 in picks
        if policy == "shortest_queue":
            assert picks == {W2}


@pytest.mark.parametrize(("protocol", "expiry_s"), [("lmfleet", 6.0), (None, 90.0)], ids=["lmfleet", "fastchat"])
async def test_a_worker_cannot_opt_out_of_expiry(protocol: str | None, expiry_s: float) -> None:
    """FastChat's `check_heart_beat: false` asks never to be expired; lmfleet expires every worker (a FastChat
    worker, which beats every 45 s, after FastChat's own 90 s)."""
    clock = FakeClock()
    async with controller(clock=clock) as (c, _):
        body = {**reg_body(W1, "m", protocol=protocol), "check_heart_beat": False}
        assert (await c.post("/register_worker", json=body)).is_success
        clock.now += expiry_s + 0.5
        assert await addresses(c) == []
        assert (await c.post("/get_worker_address", json={"model": "m"})).json() == {"address": ""}


async def test_write_routes_stay_closed_with_any_method_or_path_trick() -> None:
    app = create_app(ControllerSettings(registration_secret=SECRET), clock=FakeClock())
    async with controller(app=app) as (c, _):
        for path in ("/register_worker/", "//register_worker", "/register_worker?x=1", "/REGISTER_WORKER"):
            resp = await c.post(path, json=reg_body(W1, "m"))
            assert resp.status_code in (307, 401, 404), (path, resp.status_code)
        assert await addresses(c) == []
