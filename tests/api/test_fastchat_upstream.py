"""lmfleet's API server over FastChat parts (lmfleet.api.fastchat_upstream), in process with fakes: a chat on a
FastChat worker is prompted as FastChat's API server prompts it; failover goes to and from FastChat workers before
the first token; a generation on a FastChat worker is never resumed (its stream ends with a visible error), nor is an
lmfleet worker's resumed on one; a worker's HTTP error reaches the client only as an OpenAI error; requests a FastChat
worker cannot take go to lmfleet workers; the fleet view comes from FastChat's controller routes."""

from __future__ import annotations

import json

import pytest

from .fakes import CONV, Fleet, assert_error, expected_reply, serve, sse_events

WORDS = "one two three four five six"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": WORDS}]
CHAT = {"model": "echo", "messages": MESSAGES}


def stream_text(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def mixed(first: str) -> Fleet:
    """`f` (FastChat) and `b` (lmfleet) serve `echo`; the load reported makes `first` the one picked first."""
    fleet = Fleet({"echo": ["b", "f"]}, fastchat=("f",))
    other = "b" if first == "f" else "f"
    fleet.controller.load[fleet.workers[other].address] = 1
    return fleet


async def test_a_chat_on_a_fastchat_worker_is_prompted_as_fastchats_api_server_prompts_it() -> None:
    fleet = Fleet({"echo": ["f"]}, fastchat=("f",))
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=4, temperature=0)
        assert out.choices[0].message.content == expected_reply(WORDS, max_tokens=4)
        assert out.choices[0].finish_reason == "length"
        (params,) = fleet.workers["f"].params
        assert params["prompt"] == CONV.prompt(MESSAGES) == f"Be brief.\nUSER: {WORDS}\nASSISTANT:"
        assert params["stop"] == ["USER:"] and params["stop_token_ids"] == [7]  # the template's
        assert params["echo"] is False and params["max_new_tokens"] == 4 and params["temperature"] == 0
        assert out.usage is not None and out.usage.completion_tokens == 4

        stream = await api.raw.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "stream": True})
        assert stream_text(sse_events(stream.text)) == out.choices[0].message.content

        whole = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert whole.choices[0].message.content == WORDS and whole.choices[0].finish_reason == "stop"
        prompt_tokens = len(CONV.prompt(MESSAGES).split())  # the fake counts words
        assert fleet.workers["f"].params[-1]["max_new_tokens"] == 64 - prompt_tokens  # the rest of the context


async def test_a_completion_with_echo_on_a_fastchat_worker() -> None:
    fleet = Fleet({"echo": ["f"]}, fastchat=("f",))
    async with serve(fleet) as api:
        prompt = f"USER: {WORDS}\nASSISTANT:"
        out = await api.openai.completions.create(model="echo", prompt=prompt, max_tokens=3, echo=True)
        assert out.choices[0].text == prompt + expected_reply(WORDS, max_tokens=3)
        assert fleet.workers["f"].params[-1]["prompt"] == prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [({"max_tokens": 60}, "max_tokens"), ({"messages": [{"role": "user", "content": "x " * 70}]}, "messages")],
)
async def test_a_prompt_too_long_for_a_fastchat_worker_is_lmfleets_400(body: dict, param: str) -> None:
    fleet = Fleet({"echo": ["f"]}, fastchat=("f",))
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, **body})
        assert_error(resp, 400, param=param, code="context_length_exceeded")
        assert fleet.workers["f"].params == []  # counted, never sent


@pytest.mark.parametrize(
    ("failure", "ejected"),
    [
        ({"down": True}, True),
        ({"reject": (404, {"detail": "Not Found"})}, True),  # not a FastChat route after all
        ({"inband": 50001}, True),  # FastChat's internal error
        ({"inband": 42903}, False),  # FastChat's "overloaded": full, not failed
        ({"then": "break", "after": 0}, True),
    ],
    ids=["refused", "http-404", "internal", "overloaded", "closed"],
)
async def test_failover_from_a_fastchat_worker_before_the_first_token(failure: dict, ejected: bool) -> None:
    fleet = mixed(first="f")
    for key, value in failure.items():
        setattr(fleet.workers["f"], key, value)
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert out.choices[0].message.content == WORDS
        assert len(fleet.workers["b"].requests) == 1
        assert api.router.is_ejected(fleet.workers["f"].address) is ejected


async def test_failover_to_a_fastchat_worker_before_the_first_token() -> None:
    fleet = mixed(first="b")
    fleet.workers["b"].reject = (500, {"error": {"message": "boom", "type": "internal_error"}})
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert out.choices[0].message.content == WORDS
        assert len(fleet.workers["f"].params) == 1


@pytest.mark.parametrize("kind", ["fastchat", "lmfleet"])
async def test_a_workers_http_error_reaches_the_client_only_as_an_openai_error(kind: str) -> None:
    fleet = Fleet({"echo": ["w"]}, fastchat=("w",) if kind == "fastchat" else ())
    fleet.workers["w"].reject = (404, {"detail": "Not Found"})
    async with serve(fleet) as api:
        err = assert_error(await api.raw.post("/v1/chat/completions", json=CHAT), 502, type_="upstream_error")
        assert "detail" not in err["message"]


async def test_a_fastchat_workers_in_band_client_error_is_not_retried() -> None:
    fleet = mixed(first="f")
    fleet.workers["f"].inband = 40303  # context overflow
    async with serve(fleet) as api:
        assert_error(
            await api.raw.post("/v1/chat/completions", json=CHAT), 400, param="messages", code="context_length_exceeded"
        )
        assert fleet.workers["b"].requests == []


@pytest.mark.parametrize("then", ["error_chunk", "break"])
async def test_a_generation_on_a_fastchat_worker_is_not_resumed_its_stream_ends_with_an_error(then: str) -> None:
    fleet = mixed(first="f")
    fleet.workers["f"].then, fleet.workers["f"].after = then, 2
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        assert set(json.loads(events[-2])) == {"error"}  # visible, after the text that came
        assert stream_text(events[:-1]) == "one two"
        assert fleet.workers["b"].requests == []  # it could not be continued token for token anywhere


async def test_an_lmfleet_generation_is_resumed_on_lmfleet_workers_only() -> None:
    fleet = Fleet({"echo": ["a", "b", "f"]}, fastchat=("f",))
    fleet.controller.load = {fleet.workers["b"].address: 1, fleet.workers["f"].address: 2}  # a, then b, then f
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 3
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert out.choices[0].message.content == WORDS  # resumed on b, no gap, no duplicate
        assert fleet.workers["b"].requests[0].resume_token_ids
        fleet.workers["a"].then = fleet.workers["b"].then = "break"
        fleet.workers["a"].after = fleet.workers["b"].after = 3
        fleet.controller.load = {fleet.workers["f"].address: 5}
        api.router.eject(fleet.workers["f"].address, "busy elsewhere")  # the pick would take f only last anyway
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = sse_events(resp.text)
        assert set(json.loads(events[-2])) == {"error"}
        assert fleet.workers["f"].params == []  # never asked to continue a generation it cannot take token ids of


async def test_requests_a_fastchat_worker_cannot_take_go_to_lmfleet_workers() -> None:
    fleet = mixed(first="f")
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, logprobs=True)
        assert out.choices[0].message.content == WORDS
        assert fleet.workers["f"].params == [] and len(fleet.workers["b"].requests) == 1
        # a resumed request is one too: token ids
        await api.openai.completions.create(model="echo", prompt=[1, 2, 3], max_tokens=2)
        assert fleet.workers["f"].params == []


async def test_on_fastchat_workers_only_such_a_request_is_a_400_saying_why() -> None:
    fleet = Fleet({"echo": ["f"]}, fastchat=("f",))
    async with serve(fleet) as api:
        body = {**CHAT, "response_format": {"type": "json_object"}}
        err = assert_error(await api.raw.post("/v1/chat/completions", json=body), 400)
        assert "FastChat" in err["message"] and "response format" in err["message"]
        err = assert_error(await api.raw.post("/tokenize", json={"model": "echo", "prompt": "hi"}), 400)
        assert "FastChat" in err["message"]


async def test_the_fleet_view_from_fastchats_controller() -> None:
    """FastChat's controller has no /workers: the models, a worker per model, and each worker's own status."""
    fleet = Fleet({"echo": ["b", "f"], "other": ["f"]}, fastchat=("f",), fastchat_controller=True)
    async with serve(fleet) as api:
        models = await api.openai.models.list()
        assert sorted(m.id for m in models.data) == ["echo", "other"]
        for _ in range(3):  # FastChat's controller gives out one worker per model per refresh
            await api.router.refresh()
        protocols = {w.address: w.status.protocol for w in api.router.workers()}
        assert protocols == {fleet.workers["b"].address: "lmfleet", fleet.workers["f"].address: "fastchat"}
        out = await api.openai.chat.completions.create(model="other", messages=MESSAGES)
        assert out.choices[0].message.content == WORDS and len(fleet.workers["f"].params) == 1
        fleet.workers["b"].down = True  # gone: dropped from the view at the next refresh
        await api.router.refresh()
        assert [w.address for w in api.router.workers()] == [fleet.workers["f"].address]
