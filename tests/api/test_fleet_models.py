"""A fleet of workers that load models on demand, through the API server, against fake workers that report their
models' states: requests go where a model is loaded, then where it is loading, else to one worker chosen to load
it; a stream whose worker dies resumes on a worker that loads the model; every servable model is listed with its
state; a model the fleet is starting is a 503, not a 404; the admin routes and their keys; the model metrics and
the dashboard's figures."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest

from tests.conformance import validate
from tests.scrape import scrape

from .fakes import Fleet, assert_error, eventually, expected_reply, serve, sse_events

GB = 1 << 30
MODELS = ("m1", "m2", "m3")
WORDS = "one two three four five six"
MESSAGES = [{"role": "user", "content": WORDS}]


def on_demand(*names: str) -> Fleet:
    """Workers `names`, each able to serve every model of MODELS, none loaded yet."""
    fleet = Fleet({m: list(names) for m in MODELS})
    for name in names:
        report(fleet, name)
    return fleet


def report(fleet: Fleet, name: str, *, budget: int = 8 * GB, **states: Any) -> None:
    """What worker `name` reports from now on: `states` maps a model to its state or (state, memory GB, pinned)."""
    models = []
    for model in MODELS:
        spec = states.get(model, "unloaded")
        state, gb, pinned = (spec, 0, False) if isinstance(spec, str) else (*spec, False)[:3]
        models.append(
            {"name": model, "state": state, "memory_bytes": int(gb * GB), "pinned": pinned, "load_seconds": 2.5}
        )
    fleet.controller.reports[fleet.workers[name].address] = {"models": models, "memory_budget_bytes": budget}


def served_by(fleet: Fleet) -> Counter[str]:
    return Counter({name: len(w.requests) for name, w in fleet.workers.items() if w.requests})


async def fresh_view(api: Any) -> None:
    """A view fetched after this point (a refresh already in flight may have read the controller before)."""
    await api.router.refresh()
    await api.router.refresh()


async def chat(api: Any, model: str) -> str:
    out = await api.openai.chat.completions.create(model=model, messages=MESSAGES)
    return out.choices[0].message.content


async def test_requests_for_a_model_go_to_the_worker_that_holds_it() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "a", m1=("loaded", 2))
    report(fleet, "b", m2=("loaded", 2))
    async with serve(fleet) as api:
        for _ in range(6):
            assert await chat(api, "m1") == expected_reply(WORDS)
        assert served_by(fleet) == {"a": 6}
        for _ in range(3):
            await chat(api, "m2")
        assert served_by(fleet) == {"a": 6, "b": 3}


async def test_a_model_nobody_holds_loads_on_one_worker_and_requests_queue_there() -> None:
    fleet = on_demand("a", "b", "c")
    async with serve(fleet) as api:
        await asyncio.gather(*(chat(api, "m3") for _ in range(5)))  # one load target for them all
        (target,) = served_by(fleet)
        report(fleet, target, m3="loading")  # the worker says so at its next heartbeat
        await fresh_view(api)
        await asyncio.gather(*(chat(api, "m3") for _ in range(3)))
        assert served_by(fleet) == {target: 8}


async def test_a_load_goes_where_there_is_room() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "a", budget=4 * GB, m1=("loaded", 3))
    report(fleet, "b", budget=8 * GB, m2=("loaded", 3))
    async with serve(fleet) as api:
        await chat(api, "m1")  # m1's size is now known: 3 GB, which only b has room for
        await chat(api, "m3")
        assert served_by(fleet) == {"a": 1, "b": 1}


async def test_streams_of_a_killed_worker_resume_on_one_worker_that_loads_the_model() -> None:
    fleet = on_demand("a", "b", "c")
    report(fleet, "a", m1=("loaded", 2))
    a = fleet.workers["a"]
    a.then, a.after = "break", 3  # dies after the first two words of every stream
    async with serve(fleet) as api:
        body = {"model": "m1", "messages": MESSAGES, "stream": True}
        answers = await asyncio.gather(*(api.raw.post("/v1/chat/completions", json=body) for _ in range(2)))
        for resp in answers:
            events = sse_events(resp.text)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected_reply(WORDS)
        resumed = {name: w.requests for name, w in fleet.workers.items() if name != "a" and w.requests}
        assert len(resumed) == 1  # both went to the same worker: one load, not two
        assert all(r.resume_token_ids == [1, 2] for r in next(iter(resumed.values())))


async def test_an_unknown_model_is_404_a_starting_one_503_until_it_registers() -> None:
    fleet = Fleet({"echo": ["a"]})
    async with serve(fleet, expected_models=["later"]) as api:
        body = {"model": "nope", "messages": MESSAGES}
        assert_error(await api.raw.post("/v1/chat/completions", json=body), 404, param="model", code="model_not_found")
        resp = await api.raw.post("/v1/chat/completions", json={**body, "model": "later"})
        assert_error(resp, 503, code="no_worker_available")
        assert resp.headers["retry-after"] == "1"
        assert_error(await api.raw.get("/v1/models/later"), 503, code="no_worker_available")
        assert_error(await api.raw.get("/v1/models/nope"), 404, param="model", code="model_not_found")

        fleet.controller.models["later"] = [fleet.workers["a"].address]  # its worker registers
        fleet.workers["a"].models.append("later")
        await fresh_view(api)
        assert await chat(api, "later") == expected_reply(WORDS)


async def test_models_lists_every_servable_model_with_its_state() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "a", m1=("loaded", 2), m2="failed")
    report(fleet, "b", m1="loading", m2="loading")
    fleet.controller.models["solo"] = ["http://solo.test"]  # a one-model worker, which reports no states
    async with serve(fleet) as api:
        body = (await api.raw.get("/v1/models")).json()
        validate("ListModelsResponse", body)
        assert {m["id"]: m["status"] for m in body["data"]} == {
            "m1": {"value": "loaded"},
            "m2": {"value": "loading"},
            "m3": {"value": "unloaded"},
            "solo": {"value": "loaded"},
        }
        report(fleet, "b")
        await fresh_view(api)
        card = (await api.raw.get("/v1/models/m2")).json()
        validate("Model", card)
        assert card["status"] == {"value": "unloaded", "failed": True}  # llama-server's router says it so
        models = await api.openai.models.list()
        assert sorted(m.id for m in models.data) == ["m1", "m2", "m3", "solo"]


@pytest.mark.parametrize(
    ("keys", "presented", "status"),
    [
        ({}, None, 200),  # no keys anywhere: open like the rest of the API
        ({"api_keys": ["sk-user"]}, "sk-user", 200),  # no admin keys: an API key will do
        ({"api_keys": ["sk-user"]}, None, 401),
        ({"api_keys": ["sk-user"], "admin_keys": ["sk-admin"]}, "sk-admin", 200),
        ({"api_keys": ["sk-user"], "admin_keys": ["sk-admin"]}, "sk-user", 403),  # an API key is not enough
        ({"api_keys": ["sk-user"], "admin_keys": ["sk-admin"]}, None, 401),
        ({"admin_keys": ["sk-admin"]}, None, 401),  # admin keys alone guard the admin routes only
    ],
)
async def test_admin_routes_take_the_admin_keys_else_an_api_key(
    keys: dict[str, list[str]], presented: str | None, status: int
) -> None:
    fleet = on_demand("a")
    async with serve(fleet, **keys) as api:
        headers = {"Authorization": f"Bearer {presented}"} if presented else {}
        resp = await api.raw.post("/admin/models/load", json={"model": "m1"}, headers=headers)
        assert resp.status_code == status, resp.text
        if status != 200:
            assert_error(resp, status)
            assert fleet.workers["a"].model_calls == []
        if "admin_keys" in keys and "api_keys" not in keys:
            assert (await api.raw.get("/v1/models")).status_code == 200  # the rest stays open


async def test_admin_load_unload_and_pin_go_to_the_right_workers() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "a", budget=4 * GB, m1=("loaded", 3))
    report(fleet, "b", budget=8 * GB, m1=("loaded", 3), m2=("loaded", 1))
    a, b = fleet.workers["a"], fleet.workers["b"]
    async with serve(fleet) as api:
        resp = await api.raw.post("/admin/models/load", json={"model": "m3"})
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert answer["object"] == "admin.models" and answer["model"] == "m3"
        assert [(w["address"], w["result"]["name"], w["result"]["state"]) for w in answer["workers"]] == [
            (b.address, "m3", "loaded")  # b has room; a would have to evict the m1 it holds
        ]
        assert (a.model_calls, [(action, body["model"]) for action, body in b.model_calls]) == ([], [("load", "m3")])

        resp = await api.raw.post("/admin/models/unload", json={"model": "m1"})
        assert [w["address"] for w in resp.json()["workers"]] == [a.address, b.address]  # every holder
        resp = await api.raw.post("/admin/models/pin", json={"model": "m2", "pinned": True})
        assert [w["address"] for w in resp.json()["workers"]] == [b.address]
        assert b.model_calls[-1] == ("pin", {"model": "m2", "pinned": True})
        await api.raw.post("/admin/models/pin", json={"model": "m2", "pinned": False})
        assert b.model_calls[-1] == ("pin", {"model": "m2", "pinned": False})
        resp = await api.raw.post("/admin/models/unload", json={"model": "m2", "worker": a.address})
        assert resp.status_code == 200 and a.model_calls[-1][0] == "unload" and a.model_calls[-1][1]["model"] == "m2"

        assert_error(await api.raw.post("/admin/models/load", json={"model": "nope"}), 404, param="model")
        resp = await api.raw.post("/admin/models/load", json={"model": "m1", "worker": "http://elsewhere.test"})
        assert_error(resp, 400, param="worker")
        assert_error(await api.raw.post("/admin/models/load", json={"model": "m1", "what": 1}), 400, param="what")


async def test_metrics_count_the_loads_and_unloads_seen_and_the_dashboard_shows_each_model() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "a", m1=("loaded", 2), m2=("loaded", 1))
    async with serve(fleet) as api:
        await api.router.refresh()
        await api.raw.post("/admin/models/unload", json={"model": "m2"})
        report(fleet, "a", m3=("loaded", 2))  # m1 evicted, m2 unloaded as asked, m3 loaded in 2.5 s
        await fresh_view(api)
        got = await scrape(api.raw)
        assert got.value("lmfleet_api_model_loads_total", model="m3") == 1
        assert got.value("lmfleet_api_model_loads_total", model="m1") == 0  # it was loaded before we looked
        assert got.value("lmfleet_api_model_unloads_total", model="m1", reason="evicted") == 1
        assert got.value("lmfleet_api_model_unloads_total", model="m2", reason="admin") == 1
        assert got.value("lmfleet_api_model_unloads_total", model="m2", reason="evicted") == 0
        assert got.value("lmfleet_api_model_load_seconds_sum", model="m3") == 2.5
        assert got.value("lmfleet_api_model_workers", model="m3", state="loaded") == 1
        assert got.value("lmfleet_api_model_workers", model="m3", state="unloaded") == 1
        assert got.value("lmfleet_api_model_memory_bytes", model="m3") == 2 * GB

        view = (await api.raw.get("/v1/fleet")).json()
        a = next(w for w in view["workers"] if w["address"] == fleet.workers["a"].address)
        assert a["memory_bytes"] == 2 * GB and a["memory_budget_bytes"] == 8 * GB
        assert [(m["name"], m["state"], m["memory_bytes"], m["load_seconds"]) for m in a["model_states"]] == [
            ("m1", "unloaded", 0, 2.5),
            ("m2", "unloaded", 0, 2.5),
            ("m3", "loaded", 2 * GB, 2.5),
        ]


async def test_a_worker_loading_the_model_gets_the_load_timeout_before_its_first_chunk() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "b", m1=("loaded", 2))
    release = asyncio.Event()
    fleet.all_workers(wait_for=release)  # neither answers until released
    async with serve(fleet, first_token_timeout_s=0.05) as api:
        held = asyncio.ensure_future(chat(api, "m2"))  # nobody holds m2: its worker loads it first
        await eventually(lambda: sum(len(w.requests) for w in fleet.workers.values()) == 1)
        await asyncio.sleep(0.2)  # past the first-token timeout, well within the load timeout
        release.set()
        assert await held == expected_reply(WORDS)
        assert sum(len(w.requests) for w in fleet.workers.values()) == 1  # not moved: one load, not two
        assert not any(api.router.is_ejected(w.address) for w in fleet.workers.values())


async def test_a_load_that_outlasts_the_workers_wait_is_a_503_to_retry_not_a_load_elsewhere() -> None:
    fleet = on_demand("a", "b")
    loading = {"message": "m3 is still loading", "type": "service_unavailable_error", "code": "model_loading"}
    fleet.all_workers(reject=(503, {"error": {**loading, "param": None}}))
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={"model": "m3", "messages": MESSAGES})
        assert_error(resp, 503, code="model_loading")
        assert sum(len(w.requests) for w in fleet.workers.values()) == 1
        assert not any(api.router.is_ejected(w.address) for w in fleet.workers.values())


async def test_a_worker_that_cannot_load_the_model_stays_in_rotation_and_the_model_loads_elsewhere() -> None:
    fleet = on_demand("a", "b")
    report(fleet, "a", budget=16 * GB)  # the roomier: chosen first
    failed = {"message": "m3 failed to load", "type": "service_unavailable_error", "code": "model_load_failed"}
    fleet.workers["a"].reject = (503, {"error": {**failed, "param": None}})
    async with serve(fleet) as api:
        for _ in range(3):
            assert await chat(api, "m3") == expected_reply(WORDS)
        assert served_by(fleet) == {"a": 1, "b": 3}  # tried once, then passed over
        assert not api.router.is_ejected(fleet.workers["a"].address)  # its other models are fine
