"""Routing that finds the prompt cache (lmfleet.api.affinity with the `cache_aware` policy): the key of a prompt, the
record of who holds what, and the Router's picks with it; then the API server end to end with fake workers."""

from __future__ import annotations

from collections import Counter

import pytest

from lmfleet.api.affinity import HALF_LIFE, PrefixRecord, for_worker, prefix_key
from lmfleet.api.routing import MISS_REFRESH_S, Lease, Router
from lmfleet.dispatch import BALANCE_ABS
from lmfleet.protocol.worker import ChatMessageIn, GenerateRequest

from .fakes import Fleet, serve
from .test_routing import Clock, router_for

SYSTEM = "You are a careful assistant. " * 20


def chat(*turns: str, system: str | None = SYSTEM) -> GenerateRequest:
    """A chat request: the system prompt, then user and assistant turns alternating (the last one the user's)."""
    messages = [ChatMessageIn(role="system", content=system)] if system is not None else []
    messages += [ChatMessageIn(role=("user", "assistant")[i % 2], content=t) for i, t in enumerate(turns)]
    return GenerateRequest(request_id="r", messages=messages)


def conversation(name: str, turn: int) -> GenerateRequest:
    """Turn `turn` (from 1) of conversation `name`: its earlier turns and answers, then a new question."""
    said = [f"{name} says {i}" if i % 2 == 0 else f"answer to {name} {i}" for i in range(2 * turn - 1)]
    return chat(*said)


# ---------------------------------------------------------------------------------------------------------------
# The key


def test_a_turns_key_passes_through_the_previous_turns_last_link() -> None:
    first, second = prefix_key("m", conversation("x", 1)), prefix_key("m", conversation("x", 2))
    assert second[: len(first)] == first
    assert len(second) == len(first) + 2  # the answer and the new question
    assert second[-1].chars > first[-1].chars
    assert for_worker(first)[-1] in {link.hash for link in second}  # what the worker reports is found next turn
    # Another model's, or another conversation's, keys share nothing.
    assert not {link.hash for link in prefix_key("n", conversation("x", 1))} & {link.hash for link in first}
    assert not {link.hash for link in prefix_key("m", conversation("y", 2))} & {link.hash for link in second}


def test_the_shared_preamble_is_no_link_but_tells_keys_apart() -> None:
    assert prefix_key("m", chat(system="only a system prompt")) == ()
    plain, other = prefix_key("m", chat("hi")), prefix_key("m", chat("hi", system="Another system prompt."))
    assert len(plain) == len(other) == 1 and plain[0].hash != other[0].hash
    tools = GenerateRequest(request_id="r", messages=chat("hi").messages, tools=[{"name": "f"}])
    assert prefix_key("m", tools)[0].hash != plain[0].hash


def test_raw_prompts_and_token_ids_are_keyed_by_blocks() -> None:
    text = "word " * 200
    short = prefix_key("m", GenerateRequest(request_id="r", prompt=text))
    longer = prefix_key("m", GenerateRequest(request_id="r", prompt=text + "and more " * 50))
    assert longer[: len(short) - 1] == short[:-1]  # every whole block of the shorter prompt
    assert set(for_worker(short)) & {link.hash for link in longer}  # its worker's report finds it
    ids = prefix_key("m", GenerateRequest(request_id="r", prompt_token_ids=list(range(200))))
    assert [link.chars for link in ids] == [64, 128, 192, 200]


def test_the_record_drops_a_forgotten_worker_and_one_that_left_the_view() -> None:
    record = PrefixRecord()
    key = prefix_key("m", conversation("x", 2))
    record.sent(key[:-2], "a")
    record.sent(key, "b")
    assert {a: f.matched for a, f in record.affinity(key, ["a", "b", "c"]).items()} == {
        "a": key[-3].chars,
        "b": key[-1].chars,
        "c": 0,
    }
    record.forget("b")
    assert record.affinity(key, ["b"])["b"].matched == 0
    record.reported({"b": [key[-1].hash]})  # what b reports itself still counts
    assert record.affinity(key, ["a", "b"])["b"].matched == key[-1].chars
    record.reported({"b": []})  # a left the view
    assert record.affinity(key, ["a", "b"]) == {a: record.affinity(key, [a])[a] for a in "ab"}
    assert record.affinity(key, ["a"])["a"].matched == 0


def test_the_record_is_bounded_and_counts_recent_requests_only() -> None:
    record = PrefixRecord(size=10)
    for i in range(30):
        record.sent(prefix_key("m", conversation(str(i), 3)), "a")
    assert record.affinity(prefix_key("m", conversation("0", 3)), ["a"])["a"].matched == 0  # dropped
    assert record.affinity(prefix_key("m", conversation("29", 3)), ["a"])["a"].matched > 0
    recent = record.affinity((), ["a"])["a"].recent
    for _ in range(HALF_LIFE):
        record.sent((), "b")
    assert record.affinity((), ["a"])["a"].recent == pytest.approx(recent / 2)
    assert record.affinity((), ["b"])["b"].recent < HALF_LIFE


# ---------------------------------------------------------------------------------------------------------------
# The Router's picks


async def turn(router: Router, name: str, n: int) -> str:
    lease = await router.acquire("m", key=prefix_key("m", conversation(name, n)))
    assert lease is not None
    lease.release()
    return lease.address


async def test_a_conversations_turns_stay_on_one_worker_and_conversations_spread() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    async with router_for(fleet, policy="cache_aware") as router:
        homes: dict[str, set[str]] = {}
        for n in range(1, 5):
            for name in "pqrstu":  # a shared system prompt, six conversations
                homes.setdefault(name, set()).add(await turn(router, name, n))
        assert all(len(h) == 1 for h in homes.values()), homes
        assert sorted(Counter(h.pop() for h in homes.values()).values()) == [3, 3]


async def test_a_replica_that_joins_takes_new_conversations_and_the_old_ones_stay() -> None:
    fleet = Fleet({"m": ["a", "b", "c"]})
    c = fleet.workers["c"].address
    fleet.controller.models["m"].remove(c)
    async with router_for(fleet, policy="cache_aware") as router:
        homes = {name: await turn(router, name, 1) for name in "pqrs"}
        fleet.controller.models["m"].append(c)  # c registers
        await router.refresh()
        assert {name: await turn(router, name, 2) for name in "pqrs"} == homes
        assert await turn(router, "new", 1) == c


async def test_no_worker_is_held_above_the_cap_under_a_skewed_workload() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    async with router_for(fleet, policy="cache_aware") as router:
        key = prefix_key("m", conversation("hot", 3))
        await turn(router, "hot", 2)
        leases: list[Lease] = []
        for _ in range(40):  # every request continues one conversation, none finishes
            lease = await router.acquire("m", key=key)
            assert lease is not None
            leases.append(lease)
            open_ = [router.open_requests(w.address) for w in router.healthy()]
            assert max(open_) - min(open_) <= BALANCE_ABS + 1
        assert min(Counter(lease.address for lease in leases).values()) > 10


async def test_an_ejected_workers_conversations_move_and_stay_moved() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    clock = Clock()
    async with router_for(fleet, policy="cache_aware", clock=clock, eject_backoff_s=1) as router:
        await router.refresh()
        home = await turn(router, "x", 1)
        assert await turn(router, "x", 2) == home
        router.eject(home, "connection refused")
        moved = await turn(router, "x", 3)
        assert moved != home
        clock.advance(2)
        await router.refresh()
        await router.refresh()  # a new heartbeat: readmitted
        assert not router.is_ejected(home)
        assert await turn(router, "x", 4) == moved


async def test_a_second_api_server_learns_who_holds_what_from_the_heartbeats() -> None:
    fleet = Fleet({"m": ["a", "b"]})
    clock = Clock()
    async with (
        router_for(fleet, policy="cache_aware") as first,
        router_for(fleet, policy="cache_aware", clock=clock) as second,
    ):
        await second.refresh()
        homes = {name: await turn(first, name, 1) for name in "pqrstu"}
        assert len(set(homes.values())) == 2
        for address in {*homes.values()}:  # what each worker was sent, as its heartbeat reports it
            sent = [prefix_key("m", conversation(n, 1)) for n, a in homes.items() if a == address]
            fleet.controller.prefixes[address] = [h for key in sent for h in for_worker(key)]
        clock.advance(MISS_REFRESH_S)  # a later turn nobody is known to hold looks at a view older than this again
        assert {name: await turn(second, name, 2) for name in "utsrqp"} == homes  # not the order `first` saw
        # A worker that leaves the view takes its report with it; nothing routes to it.
        gone = homes["p"]
        fleet.controller.models["m"] = [a for a in fleet.controller.models["m"] if a != gone]
        await second.refresh()
        assert await turn(second, "p", 3) != gone


# ---------------------------------------------------------------------------------------------------------------
# The API server with fake workers


async def test_chat_turns_reach_the_worker_that_served_the_conversation_and_move_when_it_dies() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    async with serve(fleet, dispatch_policy="cache_aware") as api:
        histories = {name: [{"role": "system", "content": SYSTEM}] for name in "pqrs"}
        served: dict[str, list[str]] = {name: [] for name in histories}
        for n in range(3):
            for name, history in histories.items():
                history.append({"role": "user", "content": f"{name} asks {n}"})
                before = {w: len(fleet.workers[w].requests) for w in "ab"}
                reply = await api.openai.chat.completions.create(model="echo", messages=history)
                history.append({"role": "assistant", "content": reply.choices[0].message.content})
                (worker,) = [w for w in "ab" if len(fleet.workers[w].requests) > before[w]]
                served[name].append(worker)
                assert fleet.workers[worker].requests[-1].prefix_hashes  # the worker is told the prompt's key
        assert all(len(set(ws)) == 1 for ws in served.values()), served
        assert sorted(Counter(ws[0] for ws in served.values()).values()) == [2, 2]

        fleet.workers["a"].down = True  # killed mid-conversation
        for name, history in histories.items():
            history.append({"role": "user", "content": f"{name} asks again"})
            reply = await api.openai.chat.completions.create(model="echo", messages=history)
            assert reply.choices[0].message.content == f"{name} asks again"
        assert fleet.workers["b"].requests[-1].messages[-1].content == "s asks again"


async def test_a_responses_chain_follows_its_previous_turn_also_through_a_second_api_server(tmp_path) -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    db = str(tmp_path / "responses.db")

    def served() -> dict[str, str]:
        """The worker each input went to (the fake worker answers the last message)."""
        return {r.messages[-1].content: w for w in "ab" for r in fleet.workers[w].requests}

    async with serve(fleet, dispatch_policy="cache_aware", responses_db=db) as one:
        previous = {}
        for name in "pqrs":
            previous[name] = await one.openai.responses.create(model="echo", input=f"{name} one", instructions="Hi.")
        assert sorted(Counter(served().values()).values()) == [2, 2]
    homes = {name: served()[f"{name} one"] for name in "pqrs"}
    order = sorted("pqrs", key=lambda n: homes[n])  # two on one worker first: no guess gets both right
    fleet.heartbeat()
    async with serve(fleet, dispatch_policy="cache_aware", responses_db=db) as two:  # knows only the heartbeats
        for name in order:
            second = await two.openai.responses.create(
                model="echo", input=f"{name} two", instructions="Hi.", previous_response_id=previous[name].id
            )
            assert second.output_text == f"{name} two"
    where = served()
    assert all(where[f"{name} two"] == where[f"{name} one"] for name in "pqrs"), where
