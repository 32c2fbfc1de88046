"""lmfleet.placement: a model's state per worker and across the fleet, the candidate tiers, where a model nobody
holds is loaded, and what the API server remembers of its choices and sees change."""

from __future__ import annotations

from typing import Any

from lmfleet.placement import Placement, fleet_state, load_target, state_of, tasks_of
from lmfleet.protocol.worker import ModelState, WorkerInfo, WorkerStatus

GB = 1 << 30
MODELS = ["m1", "m2", "m3"]


def worker(name: str, *, budget: int | None = None, names: list[str] = MODELS, **states: Any) -> WorkerInfo:
    """A worker that can serve `names`; `states` maps a model to its state, or to (state, memory GB[, pinned])."""
    reports = []
    for model in names:
        spec = states.get(model, "unloaded")
        state, gb, pinned = (spec, 0, False) if isinstance(spec, str) else (*spec, False)[:3]
        reports.append(ModelState(name=model, state=state, memory_bytes=int(gb * GB), pinned=pinned))
    status = WorkerStatus(model_names=names, models=reports, memory_budget_bytes=budget)
    return WorkerInfo(address=f"http://{name}", status=status, last_heartbeat=0.0)


def one_model(name: str, model: str) -> WorkerInfo:
    return WorkerInfo(address=f"http://{name}", status=WorkerStatus(model_names=[model]), last_heartbeat=0.0)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_states_of_one_worker_and_of_the_fleet() -> None:
    single = one_model("s", "m1")
    assert state_of(single.status, "m1") == "loaded"  # a one-model worker's names are loaded
    a = worker("a", m1="loading", m2="failed")
    assert [state_of(a.status, m) for m in MODELS] == ["loading", "failed", "unloaded"]
    assert fleet_state([a, single], "m1") == ("loaded", False)
    assert fleet_state([a], "m1") == ("loading", False)
    assert fleet_state([a], "m2") == ("unloaded", True)  # llama-server: unloaded, its last load failed
    assert fleet_state([a], "m3") == ("unloaded", False)
    embed = WorkerStatus(
        model_names=["m1", "e"], tasks=["generate"], models=[ModelState(name="e", state="loaded", tasks=["embed"])]
    )
    assert tasks_of(embed, "e") == ["embed"] and tasks_of(embed, "m1") == ["generate"]


def test_a_model_nobody_holds_goes_where_there_is_room_before_anyone_evicts() -> None:
    full = worker("full", budget=4 * GB, m1=("loaded", 3))
    roomy = worker("roomy", budget=8 * GB, m2=("loaded", 3))
    assert load_target([full, roomy], "m3", 2 * GB, [full, roomy]) is roomy


def test_eviction_prefers_a_copy_held_elsewhere_over_the_fleets_only_copy() -> None:
    # both must evict; `a`'s m1 is the fleet's only copy, `b`'s m2 is also held by `c` (which has no room either)
    a = worker("a", budget=4 * GB, m1=("loaded", 3))
    b = worker("b", budget=4 * GB, m2=("loaded", 3))
    c = worker("c", budget=3 * GB, names=["m2"], m2=("loaded", 3))
    assert load_target([a, b], "m3", 2 * GB, [a, b, c]) is b


def test_a_worker_that_cannot_make_room_is_the_last_resort() -> None:
    pinned = worker("pinned", budget=4 * GB, m1=("loaded", 3, True))  # its only model is pinned
    busy = worker("busy", budget=4 * GB, m2=("loaded", 3))
    assert load_target([pinned, busy], "m3", 2 * GB, [pinned, busy]) is busy
    assert load_target([pinned], "m3", 2 * GB, [pinned]) is pinned  # nothing else: it decides


def test_candidates_loaded_then_loading_then_one_chosen_target_that_concurrent_requests_share() -> None:
    clock = Clock()
    placement = Placement(clock=clock, grace_s=10)
    a, b, c = worker("a", m1="loaded"), worker("b", m1="loading"), worker("c")
    assert placement.candidates([a, b, c], "m1", [a, b, c]) == [a]
    assert placement.candidates([b, c], "m1", [a, b, c]) == [b]  # a load runs: queue for it

    d = worker("d")
    first = placement.candidates([c, d], "m1", [c, d])
    assert len(first) == 1 and placement.targets() == {"m1": first[0].address}
    for _ in range(5):  # the view has not caught up: every request queues at the same worker
        assert placement.candidates([c, d], "m1", [c, d]) == first
    other = d if first[0] is c else c
    assert placement.candidates([other], "m1", [c, d]) == [other]  # that one is excluded: another is chosen

    clock.now = 100  # its report never said loading: the choice lapses, a new one is made
    placement.candidates([c, d], "m1", [c, d])
    assert placement.targets()["m1"] in {c.address, d.address}


def test_observe_reports_loads_and_unloads_and_settles_targets() -> None:
    placement = Placement()
    a = worker("a", budget=8 * GB, m1=("loaded", 2))
    assert placement.observe([a]) == []  # a worker seen for the first time has no history
    placement.chose("m2", a.address)
    placement.unloading(a.address, "m1")
    loaded = worker("a", budget=8 * GB, m2=("loaded", 3))
    loaded.status.models[1].load_seconds = 4.5
    events = placement.observe([loaded])
    assert [(e.kind, e.model, e.seconds, e.asked) for e in events] == [
        ("unload", "m1", None, True),  # asked for: not an eviction
        ("load", "m2", 4.5, False),
    ]
    assert placement.targets() == {} and placement.size("m2") == 3 * GB
    evicted = worker("a", budget=8 * GB, m3=("loaded", 1))
    assert [(e.kind, e.model, e.asked) for e in placement.observe([evicted])] == [
        ("unload", "m2", False),
        ("load", "m3", False),
    ]


def test_equal_workers_get_the_same_choice_everywhere_and_different_models_spread() -> None:
    fleet = [worker(name, budget=8 * GB, names=[f"x{i}" for i in range(8)]) for name in "abcd"]
    chosen = [load_target(fleet, f"x{i}", GB, fleet).address for i in range(8)]
    assert chosen == [load_target(list(reversed(fleet)), f"x{i}", GB, fleet).address for i in range(8)]
    assert len(set(chosen)) > 1


def test_a_model_with_requests_running_is_not_counted_on_to_make_room() -> None:
    roomier = worker("a", budget=int(4.5 * GB), m1=("loaded", 3))  # unloading m1 would leave it the most room
    other = worker("b", budget=4 * GB, m2=("loaded", 3))
    assert load_target([roomier, other], "m3", 2 * GB, [roomier, other]) is roomier
    busy = {("http://a", "m1")}
    assert load_target([roomier, other], "m3", 2 * GB, [roomier, other], lambda a, m: (a, m) in busy) is other
