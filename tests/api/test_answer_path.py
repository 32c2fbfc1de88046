"""Chat, completions and Responses are answered by one path (lmfleet.api.answer), each endpoint only rendering:
the same failover before the first token and resume after it, the same ending when no worker can make up for a
failure (in each endpoint's own shape), the same usage and metrics, the same 499 and closed worker stream when the
client leaves. Driven through the official openai client where it can, plain HTTP where the wire matters, against
`create_app` in process with fake workers (fakes.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from tests.conformance import validate
from tests.scrape import scrape

from .fakes import Api, Fleet, assert_error, expected_reply, serve, sse_events

WORDS = "one two three four five six"
ENDPOINTS = ["chat", "completions", "responses"]
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses"}


def body(endpoint: str, *, stream: bool) -> dict[str, Any]:
    """The same request to each endpoint: generate from WORDS with the model `echo`."""
    what = {
        "chat": {"messages": [{"role": "user", "content": WORDS}]},
        "completions": {"prompt": WORDS},
        "responses": {"input": WORDS},
    }[endpoint]
    return {"model": "echo", "stream": stream, **what}


async def ask(api: Api, endpoint: str, *, stream: bool) -> tuple[str, int, int]:
    """(the answer's text, prompt tokens, completion tokens) as the official client reads them."""
    client: openai.AsyncOpenAI = api.openai
    if endpoint == "responses":
        if not stream:
            out = await client.responses.create(model="echo", input=WORDS)
            assert out.usage is not None
            return out.output_text, out.usage.input_tokens, out.usage.output_tokens
        events = [e async for e in await client.responses.create(model="echo", input=WORDS, stream=True)]
        final = events[-1]
        assert final.type == "response.completed" and final.response.usage is not None
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == final.response.output_text
        return text, final.response.usage.input_tokens, final.response.usage.output_tokens
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    if endpoint == "chat":
        chat = client.chat.completions
        messages: Any = [{"role": "user", "content": WORDS}]
        if not stream:
            whole = await chat.create(model="echo", messages=messages)
            assert whole.usage is not None
            return whole.choices[0].message.content or "", whole.usage.prompt_tokens, whole.usage.completion_tokens
        chunks = [
            c async for c in await chat.create(model="echo", messages=[{"role": "user", "content": WORDS}], **options)
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        if not stream:
            done = await client.completions.create(model="echo", prompt=WORDS)
            assert done.usage is not None
            return done.choices[0].text, done.usage.prompt_tokens, done.usage.completion_tokens
        chunks = [c async for c in await client.completions.create(model="echo", prompt=WORDS, **options)]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None
    return text, usage.prompt_tokens, usage.completion_tokens


def two_workers() -> Fleet:
    """`a` and `b` serve `echo`; `a` is picked first (b reports a queue)."""
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.controller.load[fleet.workers["b"].address] = 1
    return fleet


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_worker_failing_before_the_first_token_is_replaced_alike(endpoint: str, stream: bool) -> None:
    fleet = two_workers()
    fleet.workers["a"].reject = (500, {"error": {"message": "boom", "type": "internal_error"}})
    async with serve(fleet) as api:
        text, prompt_tokens, completion_tokens = await ask(api, endpoint, stream=stream)
        m = await scrape(api.raw)
    assert text == expected_reply(WORDS)
    assert (prompt_tokens, completion_tokens) == (6, 6)
    assert [len(w.requests) for w in fleet.workers.values()] == [1, 1]  # a refused it, b answered
    assert api.router.is_ejected(fleet.workers["a"].address)
    assert m.value("lmfleet_api_retries_total", model="echo", reason="worker_error") == 1
    assert m.value("lmfleet_api_prompt_tokens_total", model="echo") == prompt_tokens
    assert m.value("lmfleet_api_completion_tokens_total", model="echo") == completion_tokens
    assert m.value("lmfleet_api_time_to_first_token_seconds_count", model="echo") == 1
    assert m.value("lmfleet_api_requests_total", route=ROUTES[endpoint], model="echo", status="200") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_worker_failing_mid_stream_is_resumed_alike(endpoint: str, stream: bool) -> None:
    fleet = two_workers()
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 3
    async with serve(fleet) as api:
        text, _, completion_tokens = await ask(api, endpoint, stream=stream)
        m = await scrape(api.raw)
    assert text == expected_reply(WORDS) and completion_tokens == 6  # no gap, no duplicate, counted once
    assert m.value("lmfleet_api_resumes_total", model="echo") == 1
    (resumed,) = fleet.workers["b"].requests
    assert resumed.resume_token_ids == [1, 2]  # the ids received from a


def streamed_text(endpoint: str, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text a stream carried, its last events) from a raw SSE body, in the endpoint's own shape."""
    if endpoint == "responses":
        events = []
        for block in (b for b in text.split("\n\n") if b.strip()):
            kind, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert kind == f"event: {event['type']}"
            validate("ResponseStreamEvent", event)
            events.append(event)
        said = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        return said, events[-2:]
    payloads = sse_events(text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    key = "text" if endpoint == "completions" else "delta"
    pieces = [c["choices"][0][key] for c in chunks if c.get("choices")]
    said = "".join(p if isinstance(p, str) else p.get("content") or "" for p in pieces)
    return said, chunks[-1:]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_failure_no_worker_can_make_up_for_ends_each_stream_in_its_own_shape(endpoint: str) -> None:
    fleet = Fleet({"echo": ["a"]})
    fleet.workers["a"].then, fleet.workers["a"].after = "error_chunk", 3  # two words, then an engine error
    async with serve(fleet) as api:
        resp = await api.raw.post(ROUTES[endpoint], json=body(endpoint, stream=True))
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        said, last = streamed_text(endpoint, resp.text)
        assert said == "one two"  # what was said before the failure is kept
        if endpoint == "responses":
            error, failed = last
            assert (error["type"], failed["type"]) == ("error", "response.failed")
            assert failed["response"]["status"] == "failed" and failed["response"]["error"]["code"] == "server_error"
            assert "engine error" in error["message"]
        else:
            (error,) = last
            assert set(error) == {"error"} and "engine error" in error["error"]["message"]
        # not streamed, the same failure is a 502 like any error before the answer
        assert_error(await api.raw.post(ROUTES[endpoint], json=body(endpoint, stream=False)), 502)
        m = await scrape(api.raw)
    route = ROUTES[endpoint]
    assert m.value("lmfleet_api_requests_total", route=route, model="echo", status="200") == 1
    assert m.value("lmfleet_api_requests_total", route=route, model="echo", status="502") == 1
    assert m.value("lmfleet_api_completion_tokens_total", model="echo") == 4  # two words, each time


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_an_early_failure_is_a_json_error_before_any_event(endpoint: str) -> None:
    fleet = Fleet({"echo": ["a"]})
    fleet.workers["a"].reject = (429, {"error": {"message": "server is at capacity", "type": "rate_limit_error"}})
    async with serve(fleet) as api:
        resp = await api.raw.post(ROUTES[endpoint], json=body(endpoint, stream=True))
        assert_error(resp, 429, type_="rate_limit_error")
        assert resp.headers["retry-after"] == "1"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_an_operator_limit_is_a_400_before_any_worker_is_asked(endpoint: str) -> None:
    from lmfleet.api.access import RequestLimits

    async with serve(limits=RequestLimits(max_message_chars=5)) as api:
        resp = await api.raw.post(ROUTES[endpoint], json=body(endpoint, stream=False))
        param = {"chat": "messages.0.content", "completions": "prompt", "responses": "input"}[endpoint]
        assert_error(resp, 400, param=param)
        assert not api.fleet.workers["a"].requests


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_client_leaving_before_the_first_token_is_a_499_and_closes_the_worker_stream(
    endpoint: str, stream: bool
) -> None:
    fleet = Fleet()
    worker = fleet.workers["a"]
    worker.then = "stall"
    async with serve(fleet) as api, api.streaming() as client:
        call = asyncio.create_task(client.post(ROUTES[endpoint], json=body(endpoint, stream=stream)))
        await worker.hanging.wait()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        assert worker.cancelled == [r.request_id for r in worker.requests] and len(worker.requests) == 1
        m = await scrape(api.raw)
    assert m.value("lmfleet_api_requests_total", route=ROUTES[endpoint], model="echo", status="499") == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_a_client_leaving_mid_stream_closes_the_worker_stream(endpoint: str) -> None:
    fleet = Fleet()
    worker = fleet.workers["a"]
    worker.then = "hang"  # one chunk, then nothing until the client goes away
    async with serve(fleet) as api, api.streaming() as client:
        async with client.stream("POST", ROUTES[endpoint], json=body(endpoint, stream=True)) as resp:
            assert resp.status_code == 200
            await worker.hanging.wait()
        (req,) = worker.requests
        assert worker.cancelled == [req.request_id]


async def test_the_three_endpoints_ask_the_worker_the_same_way() -> None:
    """The worker request each endpoint's answer is generated with: one choice, its id the answer's, the model
    resolved, the same limit."""
    async with serve() as api:
        chat = await api.openai.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": WORDS}], max_tokens=2
        )
        done = await api.openai.completions.create(model="echo", prompt=WORDS, max_tokens=2)
        out = await api.openai.responses.create(model="echo", input=WORDS, max_output_tokens=2)
        sent = api.fleet.workers["a"].requests
    assert [r.request_id for r in sent] == [f"{chat.id}-0", f"{done.id}-0", f"{out.id}-0"]
    assert {r.model for r in sent} == {"echo"} and {r.max_tokens for r in sent} == {2}
    assert chat.choices[0].message.content == done.choices[0].text == out.output_text == "one two"
    assert chat.choices[0].finish_reason == done.choices[0].finish_reason == "length" and out.status == "incomplete"
