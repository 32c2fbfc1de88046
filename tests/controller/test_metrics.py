"""The controller's /metrics: live workers by model and state, registry events, dispatch decisions by policy."""

from __future__ import annotations

from lmfleet.controller.app import ControllerSettings
from tests.scrape import scrape

from .test_app import W1, W2, controller, reg_body

W3 = "http://127.0.0.1:31003"


async def test_workers_events_and_dispatch_are_exposed() -> None:
    settings = ControllerSettings(dispatch_policy="lottery", heartbeat_expiry_s=10)
    async with controller(settings) as (client, clock):
        assert (await client.post("/register_worker", json=reg_body(W1, "m1"))).status_code == 200
        assert (await client.post("/register_worker", json=reg_body(W2, "m1", "m2", running=2, waiting=1))).is_success
        assert (await client.post("/register_worker", json=reg_body(W3, "m2", running=1))).is_success
        assert (await client.post("/register_worker", json=reg_body(W1, "m1"))).is_success  # again: re-registered
        assert (await client.post("/get_worker_address", json={"model": "m1"})).json()["address"]
        assert (await client.post("/get_worker_address", json={"model": "nobody-serves-this"})).json()["address"] == ""
        m = await scrape(client)
        assert m.types["lmfleet_controller_workers"] == "gauge"
        assert m.value("lmfleet_controller_workers", model="m1", state="idle") == 1
        assert m.value("lmfleet_controller_workers", model="m1", state="queueing") == 1
        assert m.value("lmfleet_controller_workers", model="m2", state="busy") == 1
        assert m.value("lmfleet_controller_workers", model="m2") == 2
        assert m.value("lmfleet_controller_worker_events_total", event="registered") == 3
        assert m.value("lmfleet_controller_worker_events_total", event="re-registered") == 1
        assert m.value("lmfleet_controller_dispatch_total", policy="lottery", result="worker") == 1
        assert m.value("lmfleet_controller_dispatch_total", policy="lottery", result="none") == 1
        assert "nobody-serves-this" not in m.text
        route = "/register_worker"
        assert m.value("lmfleet_controller_requests_total", route=route, method="POST", status="200") == 4

        assert (await client.post("/unregister_worker", json={"worker_name": W3})).json() == {"removed": True}
        clock.now += 11  # W1 and W2 stop heartbeating
        m = await scrape(client)
        assert m.value("lmfleet_controller_workers") == 0
        assert m.value("lmfleet_controller_worker_events_total", event="expired") == 2
        assert m.value("lmfleet_controller_worker_events_total", event="unregistered") == 1
