"""The dashboard's data (`GET /v1/fleet`, lmfleet.api.fleet): the rolling request figures with a hand-driven clock,
and the snapshot of the fleet through the API app against fake workers."""

from __future__ import annotations

import asyncio

import pytest

from lmfleet.api.fleet import FleetStats, FleetView, quantile
from lmfleet.metrics import TimedRequest

from .fakes import Fleet, serve
from .test_routing import Clock

pytestmark = pytest.mark.timeout(60)


def chat(status: int, latency_s: float, first_byte_s: float | None) -> TimedRequest:
    return TimedRequest("/v1/chat/completions", "POST", "m", status, latency_s, first_byte_s)


def test_rates_percentiles_and_history_over_the_window() -> None:
    clock = Clock()
    stats = FleetStats(window_s=60, step_s=5, clock=clock)
    for i in range(10):  # one request per second for 10 s, latencies 0.1 .. 1.0, 7 tokens each
        stats.request_started("/v1/chat/completions", "POST")
        stats.request_done(chat(200, 0.1 * (i + 1), 0.05))
        stats.tokens("w", 7)
        clock.advance(1)
    assert stats.rate(10) == pytest.approx(1.0)
    assert stats.tokens_per_s("w", 5) == pytest.approx(7.0)
    assert stats.tokens_per_s("other") == 0
    assert stats.latency(0.5) == pytest.approx(0.5)
    assert stats.latency(0.95) == pytest.approx(1.0)
    assert stats.latency(0.5, first_byte=True) == pytest.approx(0.05)

    history = stats.history(lambda b: sum(x.requests for x in b) / 5)
    assert len(history) == 12 and history[-2:] == [1.0, 1.0] and history[:-2] == [0.0] * 10
    stats.request_started("/v1/chat/completions", "POST")
    stats.request_done(chat(502, 9.0, None))  # errors count, their latency does not
    assert stats.latency(1.0) == pytest.approx(1.0)
    assert stats.history(lambda b: sum(x.errors for x in b))[-1] == 0  # the current second is not history yet

    stats.request_started("/v1/models", "GET")  # not a generation request: not counted
    stats.request_done(TimedRequest("/v1/models", "GET", "", 200, 5.0, 0.1))
    assert stats.latency(1.0) == pytest.approx(1.0) and stats.in_progress == 0

    clock.advance(61)  # everything has left the window
    stats.tokens("w", 1)
    assert stats.rate() == 0 and stats.latency(0.5) is None
    assert sum(v or 0 for v in stats.history(lambda b: sum(x.requests for x in b))) == 0


def test_the_current_second_counts_as_far_as_it_has_gone() -> None:
    clock = Clock()
    stats = FleetStats(clock=clock)
    clock.advance(0.5)
    stats.tokens("w", 45)
    assert stats.tokens_per_s("w", 5) == pytest.approx(45 / 4.5)


def test_quantile() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([3.0, 1.0, 2.0], 0.0) == 1.0
    assert quantile([3.0, 1.0, 2.0], 1.0) == 3.0


async def fleet_view(api) -> FleetView:
    resp = await api.raw.get("/v1/fleet")
    assert resp.status_code == 200, resp.text
    return FleetView.model_validate(resp.json())


async def test_the_fleet_lists_every_worker_with_the_tokens_this_server_relayed() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    async with serve(fleet) as api:
        await api.router.refresh()
        view = await fleet_view(api)
        assert view.controller == "up"
        assert sorted(w.address for w in view.workers) == sorted(w.address for w in fleet.workers.values())
        assert {w.state for w in view.workers} == {"ready"}
        assert all(w.models == ["m"] and w.tokens_per_s == 0 and w.kv_cache_usage is None for w in view.workers)
        assert all(w.heartbeat_age_s is not None and w.heartbeat_age_s >= 0 for w in view.workers)
        assert len(view.workers[0].tokens_per_s_history) == view.window_s // view.step_s

        reply = await api.openai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "one two three four five"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in reply if c.choices])
        assert text.split() and len(text.split()) == 5
        view = await fleet_view(api)
        served = [w for w in view.workers if w.tokens_per_s > 0]
        assert len(served) == 1 and served[0].address in {r.address for r in fleet.workers.values() if r.requests}
        assert view.requests.per_s > 0 and view.requests.in_progress == 0
        assert view.requests.latency_p50_s is not None and view.requests.first_token_p50_s is not None


async def test_a_worker_this_server_ejected_shows_as_ejected_with_the_reason() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    async with serve(fleet) as api:
        await api.router.refresh()
        fleet.workers["b"].reject = (503, {"error": {"message": "down", "type": "x", "param": None, "code": None}})
        fleet.workers["a"].down = True
        resp = await api.raw.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert resp.status_code >= 500
        view = await fleet_view(api)
        assert {w.state for w in view.workers} == {"ejected"}
        assert all(w.reason for w in view.workers)


async def test_a_worker_that_left_while_streaming_shows_as_draining() -> None:
    fleet = Fleet({"m": ["a"]})
    worker = fleet.workers["a"]
    worker.proceed = asyncio.Event()
    async with serve(fleet) as api, api.streaming() as client:
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "a b c"}], "stream": True},
        ) as resp:
            assert resp.status_code == 200
            await worker.streamed.wait()
            fleet.controller.models["m"] = []  # the worker left the controller (it drains)
            await api.router.refresh()
            view = await fleet_view(api)
            assert [(w.address, w.state, w.open) for w in view.workers] == [(worker.address, "draining", 1)]
            assert view.requests.in_progress == 1
            worker.proceed.set()
            await resp.aread()
        view = await fleet_view(api)
        assert view.workers == [] and view.requests.in_progress == 0
