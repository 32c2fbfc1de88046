"""Dispatch policies are pure functions of (workers, rng, affinity): deterministic under a seed, robust to any load
report."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lmfleet.dispatch import (
    BALANCE_ABS,
    BALANCE_REL,
    POLICIES,
    Affinity,
    cache_aware,
    get_policy,
    load,
    lottery,
    shortest_queue,
    speed,
)
from lmfleet.protocol.worker import WorkerInfo, WorkerStatus


def worker(name: str, **kw) -> WorkerInfo:
    return WorkerInfo(address=f"http://{name}", status=WorkerStatus(model_names=["m"], **kw), last_heartbeat=0.0)


def picks(policy, workers, n: int, seed: int = 0, affinity=None) -> Counter:
    rng = random.Random(seed)
    return Counter(policy(workers, rng, *([affinity] if affinity is not None else [])).address for _ in range(n))


def test_shortest_queue_picks_the_least_loaded_per_unit_of_speed() -> None:
    ws = [worker("a", queue_length=5), worker("b", queue_length=1), worker("c", queue_length=3)]
    assert picks(shortest_queue, ws, 50) == {"http://b": 50}
    # b holds 4 at speed 4 (1 per unit), a holds 2 at speed 1 (2 per unit)
    ws = [worker("a", queue_length=2), worker("b", queue_length=4, speed=4.0)]
    assert picks(shortest_queue, ws, 50) == {"http://b": 50}


def test_shortest_queue_shares_ties_between_idle_workers() -> None:
    ws = [worker("a"), worker("b"), worker("c", queue_length=1)]
    counts = picks(shortest_queue, ws, 1000, seed=1)
    assert set(counts) == {"http://a", "http://b"}
    assert min(counts.values()) > 400


def test_shortest_queue_uses_running_and_waiting_when_reported() -> None:
    # Same total load; the worker with free batch slots (nothing waiting) wins.
    ws = [worker("a", running=1, waiting=3, queue_length=4), worker("b", running=4, queue_length=4)]
    assert picks(shortest_queue, ws, 20) == {"http://b": 20}
    # A stale or FastChat-style queue_length never hides a reported split, and vice versa.
    assert load(WorkerStatus(model_names=["m"], queue_length=0, running=2, waiting=1)) == 3
    assert load(WorkerStatus(model_names=["m"], queue_length=5)) == 5


def test_lottery_is_proportional_to_speed_with_a_seeded_rng() -> None:
    ws = [worker("slow", speed=1.0), worker("fast", speed=3.0)]
    counts = picks(lottery, ws, 20_000, seed=1234)
    assert 0.72 < counts["http://fast"] / 20_000 < 0.78
    assert counts == picks(lottery, ws, 20_000, seed=1234)  # same seed, same picks


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_extreme_reports_cannot_crash_a_policy(name: str) -> None:
    policy = get_policy(name)
    ws = [
        worker("huge", speed=1_000_000, queue_length=10_000_000),
        worker("idle", speed=1e-300, queue_length=0),
        worker("busy", queue_length=10_000_000, running=10**9, waiting=10**9),
    ]
    counts = picks(policy, ws, 200)
    assert set(counts) <= {w.address for w in ws}
    # Values that bypassed validation (a cached view built by hand) are clamped, not divided by.
    odd = WorkerStatus.model_construct(model_names=["m"], speed=float("nan"), queue_length=1, running=0, waiting=0)
    bad = WorkerInfo.model_construct(address="http://odd", status=odd, last_heartbeat=0.0)
    assert speed(odd) == 1.0
    assert policy([bad], random.Random(0)) is bad


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_workers_is_an_error_not_a_pick(name: str) -> None:
    with pytest.raises(ValueError):
        POLICIES[name]([], random.Random(0))


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="lottery"):
        get_policy("round_robin")


def test_cache_aware_follows_the_longest_match_among_workers_not_overloaded() -> None:
    ws = [worker("a", queue_length=2), worker("b", queue_length=1), worker("c")]
    holds = {"http://a": Affinity(matched=900, recent=5), "http://b": Affinity(matched=300, recent=1)}
    assert picks(cache_aware, ws, 20, affinity=holds) == {"http://a": 20}  # a little busier, but it holds the most
    # Two hold as much: the less loaded of them.
    holds["http://b"] = Affinity(matched=900)
    assert picks(cache_aware, ws, 20, affinity=holds) == {"http://b": 20}


def test_cache_aware_leaves_an_overloaded_holder_only_past_both_thresholds() -> None:
    least = 4
    within_abs = least + int(BALANCE_ABS)  # more than BALANCE_REL times as loaded, but not by BALANCE_ABS more
    assert within_abs > least * BALANCE_REL
    holds = {"http://a": Affinity(matched=100)}
    for busy, expected in ((within_abs, "http://a"), (within_abs + 1, "http://b")):
        ws = [worker("a", queue_length=busy), worker("b", queue_length=least)]
        assert picks(cache_aware, ws, 10, affinity=holds) == {expected: 10}
    # By BALANCE_ABS more, but not BALANCE_REL times as many: it keeps the conversation.
    big = int(BALANCE_ABS / (BALANCE_REL - 1)) + 10
    ws = [worker("a", queue_length=big + int(BALANCE_ABS) + 1), worker("b", queue_length=big)]
    assert (big + BALANCE_ABS + 1) <= big * BALANCE_REL
    assert picks(cache_aware, ws, 10, affinity=holds) == {"http://a": 10}


def test_cache_aware_sends_what_nobody_holds_to_the_worker_sent_the_least_lately_not_overloaded() -> None:
    ws = [worker("a"), worker("b"), worker("c", queue_length=1)]
    lately = {"http://a": Affinity(recent=7), "http://b": Affinity(recent=3), "http://c": Affinity(recent=0)}
    assert picks(cache_aware, ws, 20, affinity=lately) == {"http://c": 20}
    ws[2] = worker("c", queue_length=int(BALANCE_ABS) + 1)
    assert picks(cache_aware, ws, 20, affinity=lately) == {"http://b": 20}
    lately["http://a"] = Affinity(recent=3)  # as busy lately as b: the less loaded of the two
    ws[0] = worker("a", queue_length=1)
    assert picks(cache_aware, ws, 20, affinity=lately) == {"http://b": 20}
    # Without any affinity it is shortest_queue: idle workers share the traffic.
    counts = picks(cache_aware, [worker("a"), worker("b"), worker("c", queue_length=1)], 1000, seed=1)
    assert set(counts) == {"http://a", "http://b"} and min(counts.values()) > 400
