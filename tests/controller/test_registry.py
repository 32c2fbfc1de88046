"""Registry rules, driven by a fake clock: liveness, re-registration, unknown heartbeats, views."""

from __future__ import annotations

import pytest

from lmfleet.controller.registry import Registry
from lmfleet.protocol.worker import WorkerStatus

A = "http://127.0.0.1:21002"
B = "http://127.0.0.1:21003"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def status(*models: str, **kw) -> WorkerStatus:
    return WorkerStatus(model_names=list(models), **kw)


async def test_worker_lives_while_it_heartbeats_and_expires_when_it_stops() -> None:
    clock = FakeClock()
    reg = Registry(clock, expiry_s=6.0)
    await reg.register(A, status("m"))
    for _ in range(5):  # heartbeats every 4 s keep it alive well past one expiry period
        clock.now += 4.0
        assert await reg.heartbeat(A, 0) is True
    clock.now += 6.0  # exactly the expiry: still alive
    assert await reg.expire() == []
    assert [w.address for w in reg.workers_for("m")] == [A]
    clock.now += 0.5
    assert await reg.expire() == [A]
    assert reg.all() == [] and reg.models() == []
    assert await reg.heartbeat(A, 0) is False  # it must register again


async def test_reads_never_return_a_worker_past_expiry_even_before_a_sweep() -> None:
    clock = FakeClock()
    reg = Registry(clock, expiry_s=6.0)
    await reg.register(A, status("m"))
    clock.now += 7.0
    assert reg.workers_for("m") == [] and reg.models() == [] and reg.all() == []


async def test_heartbeat_from_an_unknown_worker_does_not_add_it() -> None:
    reg = Registry(FakeClock(), expiry_s=6.0)
    assert await reg.heartbeat(A, status("m")) is False
    assert await reg.heartbeat(A, 3) is False
    assert reg.all() == [] and reg.models() == []


async def test_re_registering_replaces_models_and_status() -> None:
    reg = Registry(FakeClock(), expiry_s=6.0)
    await reg.register(A, status("old", queue_length=9))
    await reg.register(A, status("new", speed=2.0))
    assert reg.models() == ["new"]
    assert reg.workers_for("old") == []
    (info,) = reg.all()
    assert info.status.speed == 2.0 and info.status.queue_length == 0


async def test_heartbeat_updates_load() -> None:
    reg = Registry(FakeClock(), expiry_s=6.0)
    await reg.register(A, status("m", running=4, waiting=2, queue_length=6))
    assert await reg.heartbeat(A, status("m", running=1, queue_length=1))
    assert reg.all()[0].status.running == 1
    # A FastChat heartbeat carries only queue_length: the running/waiting split it does not report is cleared.
    assert await reg.heartbeat(A, 7)
    st = reg.all()[0].status
    assert (st.queue_length, st.running, st.waiting, st.model_names) == (7, 0, 0, ["m"])


async def test_unregister_and_views_across_workers() -> None:
    reg = Registry(FakeClock(), expiry_s=6.0)
    await reg.register(A, status("b-model", "a-model"))
    await reg.register(B, status("a-model"))
    assert reg.models() == ["a-model", "b-model"]
    assert [w.address for w in reg.workers_for("a-model")] == [A, B]
    assert await reg.unregister(A) is True
    assert await reg.unregister(A) is False
    assert reg.models() == ["a-model"]


def test_expiry_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Registry(expiry_s=0)
