"""The API server's view of the fleet (lmfleet.api.routing.Router) against a fake controller and fake workers, with
a hand-driven clock: what it picks, whom it ejects and readmits, and what it does while no controller answers."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from lmfleet import errors
from lmfleet.api.routing import Router
from lmfleet.client import ControllerClient, WorkerClient

from .fakes import CONTROLLER, Fleet


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def router_for(fleet: Fleet, controllers: tuple[str, ...] = (CONTROLLER,), **kw) -> AsyncIterator[Router]:
    async with fleet.http_client() as http:
        router = Router(
            [ControllerClient(http, c) for c in controllers], WorkerClient(http), rng=random.Random(0), **kw
        )
        yield router
        await router.aclose()


def addresses(fleet: Fleet, *names: str) -> set[str]:
    return {fleet.workers[n].address for n in names}


async def test_the_pick_spreads_by_load_counting_its_own_open_requests() -> None:
    fleet = Fleet({"m": ["a", "b"], "other": ["c"]})
    async with router_for(fleet) as router:
        assert await router.models() == ["m", "other"]
        leases = [await router.acquire("m") for _ in range(4)]
        assert Counter(lease.address for lease in leases) == Counter(
            {fleet.workers["a"].address: 2, fleet.workers["b"].address: 2}
        )
        for lease in leases:
            lease.release()
            lease.release()  # idempotent
        assert router.open_requests(fleet.workers["a"].address) == 0

        fleet.controller.load[fleet.workers["a"].address] = 3  # `a` reports a queue of its own
        await router.refresh()
        picks = [await router.acquire("m") for _ in range(3)]
        assert {lease.address for lease in picks} == addresses(fleet, "b")


async def test_exclude_leaves_nothing_then_none() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    async with router_for(fleet) as router:
        assert (await router.acquire("m", addresses(fleet, "a"))).address == fleet.workers["b"].address
        assert await router.acquire("m", addresses(fleet, "a", "b")) is None


async def test_an_ejected_worker_comes_back_only_after_a_new_heartbeat_and_the_backoff() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    clock = Clock()
    a = fleet.workers["a"].address
    async with router_for(fleet, clock=clock, eject_backoff_s=5) as router:
        await router.refresh()
        router.eject(a, "connection refused")
        assert {(await router.acquire("m")).address for _ in range(4)} == addresses(fleet, "b")
        await router.refresh()  # notes the heartbeat it has now
        await router.refresh()  # a newer one, but the back-off is not over
        assert router.is_ejected(a)
        clock.advance(5)
        await router.refresh()
        assert not router.is_ejected(a)
        assert [w.address for w in router.healthy()] == [a, fleet.workers["b"].address]


async def test_a_worker_that_stopped_heartbeating_stays_ejected() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    clock = Clock()
    a = fleet.workers["a"].address
    async with router_for(fleet, clock=clock) as router:
        await router.refresh()
        fleet.controller.silent.add(a)  # killed: the controller still lists it until the expiry
        router.eject(a, "connection refused")
        for _ in range(3):
            clock.advance(10)
            await router.refresh()
        assert router.is_ejected(a)
        fleet.controller.models["m"] = ["http://b.test"]  # expired; when it registers again it is fresh
        await router.refresh()
        assert not router.is_ejected(a)


async def test_when_every_worker_is_ejected_they_are_all_tried_again() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    async with router_for(fleet) as router:
        await router.refresh()
        for name in ("a", "b"):
            router.eject(fleet.workers[name].address, "failed")
        assert router.healthy() == []
        assert (await router.acquire("m")).address in addresses(fleet, "a", "b")


async def test_with_the_controller_down_the_view_stays_and_ejected_workers_are_probed() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    clock = Clock()
    a = fleet.workers["a"].address
    async with router_for(fleet, clock=clock, eject_backoff_s=1) as router:
        await router.refresh()
        assert router.controller_up is True
        fleet.controller.down = True
        await router.refresh()
        assert router.controller_up is False
        assert await router.models() == ["m"]
        assert (await router.acquire("m")).address in addresses(fleet, "a", "b")

        router.eject(a, "connection refused")
        fleet.workers["a"].ready = False
        clock.advance(1)
        await router.refresh()
        assert router.is_ejected(a)  # it does not answer /ready
        fleet.workers["a"].ready = True
        await router.refresh()
        assert not router.is_ejected(a)

        fleet.controller.down = False
        await router.refresh()
        assert router.controller_up is True


async def test_the_first_controller_that_answers_wins() -> None:
    fleet = Fleet({"m": ["a"]})
    async with router_for(fleet, controllers=("http://down.test", CONTROLLER)) as router:
        assert await router.models() == ["m"]
        assert router.controller_up is True


async def test_unknown_model_is_404_and_a_model_just_left_without_workers_is_503() -> None:
    fleet = Fleet({"m": ["a"], "n": ["b"]})
    clock = Clock()
    async with router_for(fleet, clock=clock, model_memory_s=60) as router:
        with pytest.raises(errors.ModelNotFound):
            await router.acquire("nope")
        fleet.controller.models["n"] = []
        clock.advance(1)
        await router.refresh()
        with pytest.raises(errors.NoWorkerAvailable):
            await router.acquire("n")
        clock.advance(61)
        with pytest.raises(errors.ModelNotFound):
            await router.acquire("n")


async def test_a_model_registered_since_the_last_refresh_is_found() -> None:
    fleet = Fleet({"m": ["a"], "n": []})
    clock = Clock()
    async with router_for(fleet, clock=clock) as router:
        assert await router.models() == ["m"]
        fleet.controller.models["n"] = [fleet.workers["a"].address]
        clock.advance(1)
        assert (await router.acquire("n")).address == fleet.workers["a"].address


async def test_no_controller_ever_answered_is_503() -> None:
    fleet = Fleet({"m": ["a"]})
    fleet.controller.down = True
    async with router_for(fleet) as router:
        with pytest.raises(errors.ServiceUnavailable) as info:
            await router.acquire("m")
        assert not isinstance(info.value, errors.NoWorkerAvailable) and not router.loaded
