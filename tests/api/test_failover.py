"""Nothing is lost when a worker fails: the API server retries before the first token, resumes after it on another
replica (same answer, no duplicate, no gap, usage counted once), treats a silent worker like a dead one, and says
so with an error event only when no replica is left. Also: readiness and the graceful drain. Fake workers
(fakes.py) can refuse connections, fail before or after any chunk, hang, and hold text back as real ones do."""

from __future__ import annotations

import asyncio
import json

import pytest

from .fakes import Fleet, assert_error, expected_reply, serve, sse_events

WORDS = "one two three four five six seven eight"
MESSAGES = [{"role": "user", "content": WORDS}]
CHAT = {"model": "echo", "messages": MESSAGES}


def stream_text(events: list[str]) -> tuple[str, list[dict]]:
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")), chunks


def two_workers(first: str = "a") -> Fleet:
    """`a` and `b` serve `echo`; the load reported makes `first` the one picked first."""
    fleet = Fleet({"echo": ["a", "b"]})
    other = "b" if first == "a" else "a"
    fleet.controller.load[fleet.workers[other].address] = 1
    return fleet


@pytest.mark.parametrize(
    "failure",
    [
        {"down": True},  # refuses the connection (killed)
        {"reject": (500, {"error": {"message": "boom", "type": "internal_error"}})},
        {"reject": (503, {"error": {"message": "draining", "type": "service_unavailable_error"}})},
        {"then": "break", "after": 0},  # closes the stream before any chunk
    ],
    ids=["refused", "500", "503", "closed"],
)
async def test_failure_before_the_first_token_is_retried_on_another_worker(failure: dict) -> None:
    fleet = two_workers("a")
    for key, value in failure.items():
        setattr(fleet.workers["a"], key, value)
    fleet.workers["a"].cached_tokens, fleet.workers["b"].cached_tokens = 2, 5
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert out.choices[0].message.content == expected_reply(WORDS)
        assert out.usage and out.usage.prompt_tokens_details
        assert out.usage.prompt_tokens_details.cached_tokens == 5  # the worker that answered
        assert len(fleet.workers["b"].requests) == 1
        assert api.router.is_ejected(fleet.workers["a"].address)
        # the next request goes straight to the healthy worker
        await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert len(fleet.workers["b"].requests) == 2
        assert len(fleet.workers["a"].requests) == (0 if failure.get("down") else 1)


async def test_a_worker_silent_before_its_first_chunk_is_left_after_the_first_token_timeout() -> None:
    fleet = two_workers("a")
    fleet.workers["a"].then = "stall"
    async with serve(fleet, first_token_timeout_s=0.5) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "stream": True})
        text, _ = stream_text(sse_events(resp.text))
        assert text == expected_reply(WORDS)
        assert fleet.workers["a"].cancelled  # the hung request was closed
        assert api.router.is_ejected(fleet.workers["a"].address)


@pytest.mark.parametrize("then", ["break", "error_chunk", "abort", "garbage"])
@pytest.mark.parametrize("holdback", [False, True], ids=["plain", "holdback"])
async def test_mid_stream_failure_resumes_on_another_worker(then: str, holdback: bool) -> None:
    fleet = two_workers("a")
    a, b = fleet.workers["a"], fleet.workers["b"]
    a.then, a.after = then, 4  # the first word, an empty chunk, two more words; then the failure
    fleet.all_workers(holdback=holdback)
    a.cached_tokens, b.cached_tokens = 5, 10  # b's: of the prompt and the resumed ids it prefills again
    async with serve(fleet) as api:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 6}
        resp = await api.raw.post("/v1/chat/completions", json=body)
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        text, chunks = stream_text(events)
        assert text == expected_reply(WORDS, max_tokens=6)  # no duplicate, no gap
        assert {c["id"] for c in chunks} == {chunks[0]["id"]}
        assert [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]].count("assistant") == 1
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["usage"] == {  # the request as sent: the prompt once, the first attempt's cached tokens
            "prompt_tokens": 8,
            "completion_tokens": 6,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 5},
        }

        (first,) = a.requests
        (resumed,) = b.requests
        assert resumed.prompt_token_ids == fleet.vocab.ids(WORDS.split())  # from a's first chunk
        assert resumed.messages is None and resumed.resume_token_ids == [1, 2, 3]
        delivered = len("one two three" if not holdback else "one two")
        assert resumed.resume_text_chars == delivered
        assert resumed.max_tokens == 6 and resumed.request_id != first.request_id
        assert api.router.is_ejected(a.address)


async def test_a_worker_silent_mid_stream_is_left_after_the_inter_token_timeout() -> None:
    fleet = two_workers("a")
    fleet.workers["a"].then, fleet.workers["a"].after = "hang", 3
    async with serve(fleet, inter_token_timeout_s=0.5) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in out])
        assert text == expected_reply(WORDS)
        assert fleet.workers["a"].cancelled and fleet.workers["b"].requests[0].resume_token_ids == [1, 2]


async def test_non_stream_requests_fail_over_too() -> None:
    fleet = two_workers("a")
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 3
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=5)
        assert out.choices[0].message.content == expected_reply(WORDS, max_tokens=5)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == 8


async def test_echo_is_not_repeated_when_a_completion_resumes() -> None:
    fleet = two_workers("a")
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 3  # echo, first word, empty chunk
    async with serve(fleet) as api:
        out = await api.openai.completions.create(model="echo", prompt="x y z", echo=True, max_tokens=3)
        assert out.choices[0].text == "x y z" + "x y z"
        (resumed,) = fleet.workers["b"].requests
        assert resumed.echo is False and resumed.resume_text_chars == len("x")


async def test_one_choice_resumed_among_n() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 2
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, n=2, seed=1)
        assert [c.message.content for c in out.choices] == [
            expected_reply(WORDS, seed=1),
            expected_reply(WORDS, seed=2),
        ]
        assert out.usage.prompt_tokens == 8 and out.usage.completion_tokens == 16


async def test_when_no_worker_is_left_the_stream_ends_with_an_error_and_done() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.all_workers(then="break", after=2)
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert set(error) == {"error"} and error["error"]["type"] == "upstream_error"
        assert len(fleet.workers["a"].requests) + len(fleet.workers["b"].requests) == 2  # each tried once


async def test_a_client_error_from_the_worker_is_not_retried() -> None:
    fleet = two_workers("a")
    err = {"message": "too long", "type": "invalid_request_error", "param": "messages", "code": "x"}
    fleet.all_workers(reject=(400, {"error": err}))
    async with serve(fleet) as api:
        assert_error(await api.raw.post("/v1/chat/completions", json=CHAT), 400, param="messages")
        assert len(fleet.workers["a"].requests) + len(fleet.workers["b"].requests) == 1
        assert not api.router.is_ejected(fleet.workers["a"].address)


async def test_serving_goes_on_while_the_controller_is_down() -> None:
    fleet = two_workers("a")
    async with serve(fleet) as api:
        await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        fleet.controller.down = True
        await api.router.refresh()
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert out.choices[0].message.content == expected_reply(WORDS)
        assert [m.id for m in (await api.openai.models.list()).data] == ["echo"]
        ready = await api.raw.get("/ready")
        assert ready.status_code == 200 and ready.json()["controller"] == "down"


async def test_ready_needs_a_worker_in_rotation() -> None:
    fleet = Fleet({"echo": ["a"]})
    async with serve(fleet, api_keys=["sk-k"]) as api:
        ready = await api.raw.get("/ready")  # no key needed
        assert ready.status_code == 200 and ready.json()["workers"] == 1
        api.router.eject(fleet.workers["a"].address, "test")
        assert_error(await api.raw.get("/ready"), 503, code="no_worker_available")
        assert (await api.raw.get("/health")).status_code == 200


async def test_drain_finishes_requests_in_progress_and_refuses_new_ones() -> None:
    fleet = Fleet()
    worker = fleet.workers["a"]
    worker.proceed, worker.after = asyncio.Event(), 2
    async with serve(fleet) as api, api.streaming() as client:

        async def one_stream() -> list[str]:
            async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                return [line async for line in resp.aiter_lines() if line]

        in_progress = asyncio.create_task(one_stream())
        await worker.streamed.wait()
        drain = asyncio.create_task(api.drain.drain())
        await asyncio.sleep(0)  # the drain starts: from now on new requests are refused
        refused = await api.raw.post("/v1/chat/completions", json=CHAT)
        assert_error(refused, 503, type_="service_unavailable_error")
        assert refused.headers["connection"] == "close"
        assert_error(await api.raw.get("/ready"), 503)
        assert (await api.raw.get("/health")).status_code == 200
        assert not drain.done()  # still waiting for the stream

        worker.proceed.set()
        lines = await in_progress
        assert lines[-1] == "data: [DONE]"
        assert stream_text([line[len("data: ") :] for line in lines])[0] == expected_reply(WORDS)
        await drain
        assert len(worker.requests) == 1
