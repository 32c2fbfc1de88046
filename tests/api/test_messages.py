"""`/v1/messages` as Anthropic clients use it: the official `anthropic` SDK's `messages.create`, its streaming
helpers and `count_tokens`, plain HTTP where the wire matters, against `create_app` in process with fake workers
(tests/api/fakes.py). Every body, every streamed event and every error is checked against Anthropic's published
schemas (tests/conformance/anthropic.py)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from lmfleet.api.access import RequestLimits
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest
from tests.conformance.anthropic import EVENTS, validate

from .fakes import API, Fleet, expected_reply, serve

QUESTION = "What is deep learning?"
AUTH = {"x-api-key": "sk-test"}  # as Claude Code sends its key
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The events of an Anthropic SSE body, each `event: <type>` + `data: {json}` with the types matching, every
    one valid against its schema."""
    out = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == kind.removeprefix("event: ")
        validate(EVENTS[event["type"]], event)
        out.append((event["type"], event))
    return out


def ask(content: str | list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"model": "echo", "max_tokens": 64, "messages": [{"role": "user", "content": content}], **kw}


def sent_messages(fleet: Fleet) -> list[tuple[str, str | None]]:
    """What the (single) fake worker was last asked, as (role, content) pairs."""
    (worker,) = fleet.workers.values()
    return [(m.role, m.content) for m in worker.requests[-1].messages or []]


def assert_anthropic_error(resp: httpx.Response, status: int, kind: str) -> str:
    """The response is Anthropic's error body with `kind`; returns its message."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    validate("ErrorResponse", body)
    assert body["error"]["type"] == kind and body["error"]["message"], body
    assert body["request_id"] == resp.headers["x-request-id"]
    return str(body["error"]["message"])


async def test_create_with_the_official_sdk() -> None:
    async with serve() as api:
        out = await api.anthropic.messages.create(
            model="echo", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": QUESTION}]
        )
        assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
        assert out.model == "echo" and out.stop_reason == "end_turn" and out.stop_sequence is None
        assert [b.type for b in out.content] == ["text"] and out.content[0].text == expected_reply(QUESTION)
        assert out.usage.input_tokens == 4 and out.usage.output_tokens == 4
        assert out.usage.cache_read_input_tokens == 0 and out.usage.cache_creation_input_tokens == 0
        assert sent_messages(api.fleet) == [("system", "Be brief."), ("user", QUESTION)]
        (worker,) = api.fleet.workers.values()
        assert worker.requests[-1].max_tokens == 64
        raw = await api.raw.post("/v1/messages", json=ask(QUESTION), headers={"authorization": "Bearer sk-test"})
        validate("Message", raw.json())


async def test_turns_become_chat_messages_and_knobs_sampling() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "one two"}, {"type": "text", "text": "three"}]},
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}, {"type": "text", "text": "ok"}],
        },
        {"role": "user", "content": "four five", "cache_control": {"type": "ephemeral"}},
    ]
    system = [
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Use words."},
    ]
    async with serve() as api:
        await api.anthropic.messages.create(
            model="echo",
            max_tokens=8,
            system=system,  # type: ignore[arg-type]
            messages=messages,  # type: ignore[arg-type]
            metadata={"user_id": "u1"},
            thinking={"type": "disabled"},
            extra_body={"temperature": 0, "top_p": 0.5, "top_k": 3},  # no longer in the SDK's signature
        )
        assert sent_messages(api.fleet) == [
            ("system", "Be brief.\nUse words."),  # text blocks joined as the chat path joins text parts
            ("user", "one two\nthree"),
            ("assistant", "ok"),
            ("user", "four five"),
        ]
        sent = api.fleet.workers["a"].requests[-1]
        assert (sent.temperature, sent.top_p, sent.top_k, sent.max_tokens) == (0, 0.5, 3, 8)
        assert (sent.messages or [])[2].model_extra == {"reasoning_content": "hm"}  # an earlier turn's thinking
        assert sent.chat_template_kwargs == {"enable_thinking": False}  # thinking disabled


async def test_the_stream_helpers_say_what_the_whole_answer_says() -> None:
    async with serve() as api:
        whole = await api.anthropic.messages.create(**ask(QUESTION))
        async with api.anthropic.messages.stream(**ask(QUESTION)) as stream:
            texts = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(texts) == final.content[0].text == whole.content[0].text == expected_reply(QUESTION)
        assert len(texts) == 4 and final.stop_reason == "end_turn" and final.usage == whole.usage
        resp = await api.raw.post("/v1/messages", json=ask(QUESTION, stream=True), headers=AUTH)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = events_of(resp.text)
        kinds = [kind for kind, _ in events]
        assert kinds[:2] == ["message_start", "content_block_start"]
        assert set(kinds[2:-3]) == {"content_block_delta"}
        assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        start = events[0][1]["message"]
        assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == 4
        assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert events[-2][1]["usage"]["output_tokens"] == 4


async def test_max_tokens_and_stop_sequences_say_why_the_answer_stopped() -> None:
    async with serve() as api:
        cut = await api.anthropic.messages.create(**ask("a b c d e", max_tokens=2))
        assert cut.stop_reason == "max_tokens" and cut.content[0].text == "a b" and cut.stop_sequence is None
        stopped = await api.anthropic.messages.create(**ask("a b c d e", stop_sequences=["c", "zz"]))
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "c"
        assert stopped.content[0].text == "a b"
        assert api.fleet.workers["a"].requests[-1].stop == ["c", "zz"]
        unused = await api.anthropic.messages.create(**ask("a b", stop_sequences=["zz"]))
        assert unused.stop_reason == "end_turn" and unused.stop_sequence is None
        async with api.anthropic.messages.stream(**ask("a b c d e", stop_sequences=["c"])) as stream:
            final = await stream.get_final_message()
        assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", "c", "a b")


def calling_worker(fleet: Fleet, name: str = "a") -> None:
    """The worker answers with a little text, then two tool calls in pieces, as the chat path streams them; asked
    again with tool results, it answers in words."""
    worker = fleet.workers[name]
    answer = worker.chunks

    def chunks(req: GenerateRequest) -> list[GenerateChunk]:
        if any(m.role == "tool" for m in req.messages or []):
            return answer(req)
        base = {"request_id": req.request_id, "prompt_tokens": 3, "prompt_token_ids": [1, 2, 3]}
        pieces = [
            {"text": "Checking.", "token_ids": [1]},
            {"tool_calls": [{"index": 0, "id": "call_a", "name": "get_weather", "arguments": '{"city": '}]},
            {"tool_calls": [{"index": 0, "arguments": '"Paris"}'}]},
            {"tool_calls": [{"index": 1, "id": "call_b", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
        ]
        out = [GenerateChunk.model_validate({**base, **p, "completion_tokens": i}) for i, p in enumerate(pieces, 1)]
        out[-1].finish_reason = "tool_calls"
        return out

    worker.chunks = chunks  # type: ignore[method-assign]


async def test_a_tool_use_loop_with_the_sdk() -> None:
    fleet = Fleet({"echo": ["a"]})
    calling_worker(fleet)
    async with serve(fleet) as api:
        question = [{"role": "user", "content": "weather in Paris and Oslo?"}]
        out = await api.anthropic.messages.create(model="echo", max_tokens=64, messages=question, tools=[WEATHER])
        assert [b.type for b in out.content] == ["text", "tool_use", "tool_use"] and out.stop_reason == "tool_use"
        calls = [(b.id, b.name, b.input) for b in out.content if b.type == "tool_use"]
        assert calls == [("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_weather", {"city": "Oslo"})]
        sent = fleet.workers["a"].requests[-1]
        assert [t.name for t in sent.tools] == ["get_weather"] and sent.tool_choice == "auto"
        assert sent.tools[0].parameters == WEATHER["input_schema"]
        async with api.anthropic.messages.stream(model="echo", max_tokens=64, messages=question, tools=[WEATHER]) as s:
            kinds = [e.type async for e in s]
            final = await s.get_final_message()
        assert final.model_dump()["content"] == out.model_dump()["content"] and final.stop_reason == "tool_use"
        assert kinds.count("content_block_start") == 3 == kinds.count("content_block_stop")
        # the client runs its tool and sends the results back: they reach the worker as chat tool messages
        results = [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": [{"type": "text", "text": "rainy"}]},
            {"type": "text", "text": "and so?"},
        ]
        turns = [*question, {"role": "assistant", "content": out.content}, {"role": "user", "content": results}]
        after = await api.anthropic.messages.create(model="echo", max_tokens=64, messages=turns, tools=[WEATHER])
        sent = fleet.workers["a"].requests[-1]
        assert [m.role for m in sent.messages or []] == ["user", "assistant", "tool", "tool", "user"]
        assistant = (sent.messages or [])[1].model_dump()
        assert assistant["content"] == "Checking."
        assert [(c["id"], json.loads(c["function"]["arguments"])) for c in assistant["tool_calls"]] == [
            ("call_a", {"city": "Paris"}),
            ("call_b", {"city": "Oslo"}),
        ]
        assert [(m.tool_call_id, m.content) for m in (sent.messages or [])[2:4]] == [  # type: ignore[attr-defined]
            ("call_a", "sunny"),
            ("call_b", "rainy"),
        ]
        assert after.stop_reason == "end_turn" and after.content[0].type == "text"


async def test_tool_use_events_validate_against_anthropics_schemas() -> None:
    fleet = Fleet({"echo": ["a"]})
    calling_worker(fleet)
    async with serve(fleet) as api:
        body = ask("weather?", tools=[WEATHER])
        validate("Message", (await api.raw.post("/v1/messages", json=body, headers=AUTH)).json())
        events = events_of((await api.raw.post("/v1/messages", json={**body, "stream": True}, headers=AUTH)).text)
        starts = [e["content_block"] for kind, e in events if kind == "content_block_start"]
        assert starts[1] == {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}
        pieces = [e["delta"]["partial_json"] for kind, e in events if e.get("index") == 1 and kind.endswith("delta")]
        assert "".join(pieces) == '{"city": "Paris"}'


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ({"type": "auto"}, ("auto", None, True)),
        ({"type": "any"}, ("required", None, True)),
        ({"type": "tool", "name": "get_weather"}, ("required", "get_weather", True)),
        ({"type": "none"}, ("none", None, True)),
        ({"type": "any", "disable_parallel_tool_use": True}, ("required", None, False)),
        ({"type": "auto", "disable_parallel_tool_use": False}, ("auto", None, True)),
    ],
)
async def test_tool_choice_maps_to_the_chat_paths(choice: dict[str, Any], sent: tuple[Any, ...]) -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/messages", json=ask(QUESTION, tools=[WEATHER], tool_choice=choice), headers=AUTH)
        assert resp.status_code == 200, resp.text
        req = api.fleet.workers["a"].requests[-1]
        assert (req.tool_choice, req.tool_name, req.parallel_tool_calls) == sent


async def test_output_config_format_is_the_chat_paths_json_schema() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    async with serve() as api:
        body = ask(QUESTION, output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"})
        assert (await api.raw.post("/v1/messages", json=body, headers=AUTH)).status_code == 200
        assert api.fleet.workers["a"].requests[-1].json_schema == schema


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "assistant", "content": "The answer is"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]},
            "messages.0",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
        ({"tools": [{**WEATHER, "name": "no spaces please"}]}, "tools.0.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"mcp_servers": [{"type": "url", "url": "http://x", "name": "x"}]}, "mcp_servers"),
    ],
)
async def test_what_lmfleet_cannot_do_is_a_400_naming_it(body: dict[str, Any], named: str) -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/messages", json={**ask(QUESTION), **body}, headers=AUTH)
        message = assert_anthropic_error(resp, 400, "invalid_request_error")
        assert message.startswith(f"{named}:"), message
        assert not api.fleet.workers["a"].requests


async def test_the_chat_paths_limits_apply_under_the_messages_names() -> None:
    async with serve(limits=RequestLimits(max_stop=1)) as api:
        resp = await api.raw.post("/v1/messages", json=ask(QUESTION, stop_sequences=["a", "b"]), headers=AUTH)
        assert assert_anthropic_error(resp, 400, "invalid_request_error").startswith("stop_sequences:")


async def test_the_sdk_raises_the_right_exception_for_each_error() -> None:
    fleet = Fleet({"echo": ["a"], "busy": ["b"]})
    fleet.workers["b"].reject = (429, {"error": {"message": "full", "type": "rate_limit_error", "code": "queue_full"}})
    async with serve(fleet, api_keys=["sk-test"]) as api:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await api.anthropic.messages.create(**ask(QUESTION), extra_body={"temperature": 3.0})
        assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        with pytest.raises(anthropic.NotFoundError) as missing:
            await api.anthropic.messages.create(**{**ask(QUESTION), "model": "claude-sonnet-4-5"})
        assert "claude-sonnet-4-5" in missing.value.message
        with pytest.raises(anthropic.RateLimitError):
            await api.anthropic.messages.create(**{**ask(QUESTION), "model": "busy"})
        with pytest.raises(anthropic.AuthenticationError):
            await api.anthropic.with_options(api_key="wrong").messages.create(**ask(QUESTION))
        with pytest.raises(anthropic.BadRequestError):
            await api.anthropic.messages.count_tokens(model="echo", messages=[])


async def test_every_error_on_these_routes_is_anthropics_and_the_others_stay_openais() -> None:
    fleet = Fleet({"echo": ["a"]})
    async with serve(fleet, api_keys=["sk-test"], max_request_bytes=2000) as api:
        post = api.raw.post
        assert_anthropic_error(await post("/v1/messages", json=ask(QUESTION)), 401, "authentication_error")
        bad_key = {"x-api-key": "sk-wrong"}
        assert_anthropic_error(
            await post("/v1/messages/count_tokens", json={}, headers=bad_key), 401, "authentication_error"
        )
        assert_anthropic_error(await post("/v1/messages", content=b"{", headers=AUTH), 400, "invalid_request_error")
        assert_anthropic_error(await post("/v1/messages", content=b"[1]", headers=AUTH), 400, "invalid_request_error")
        big = ask("x " * 2000)
        assert_anthropic_error(await post("/v1/messages", json=big, headers=AUTH), 413, "request_too_large")
        nope = {**ask(QUESTION), "model": "nope"}
        assert_anthropic_error(await post("/v1/messages", json=nope, headers=AUTH), 404, "not_found_error")
        assert_anthropic_error(await api.raw.get("/v1/messages", headers=AUTH), 405, "invalid_request_error")
        assert_anthropic_error(await post("/v1/messages/nothing", json={}, headers=AUTH), 404, "not_found_error")
        api.fleet.workers["a"].down = True
        assert_anthropic_error(await post("/v1/messages", json=ask(QUESTION), headers=AUTH), 502, "api_error")
        # the other routes keep OpenAI's shape; x-api-key is a key there too
        chat = await post("/v1/chat/completions", json={"model": "nope", "messages": []}, headers=AUTH)
        assert chat.status_code == 400 and set(chat.json()) == {"error"}
        assert (await api.raw.get("/v1/models", headers=AUTH)).status_code == 200
        assert set((await api.raw.get("/v1/models", headers=bad_key)).json()) == {"error"}
        api.drain.draining = True
        assert_anthropic_error(await post("/v1/messages", json=ask(QUESTION), headers=AUTH), 503, "overloaded_error")


async def test_a_bug_is_a_bare_api_error(caplog: pytest.LogCaptureFixture) -> None:
    async with serve() as api:

        @api.app.post("/v1/messages/boom")
        async def boom() -> None:
            raise RuntimeError("SECRET-INTERNAL-DETAIL")

        transport = httpx.ASGITransport(app=api.asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=API) as client:
            resp = await client.post("/v1/messages/boom", json={})
        assert resp.status_code == 500 and "SECRET" not in resp.text
        body = resp.json()
        validate("ErrorResponse", body)
        assert body["error"] == {"type": "api_error", "message": "internal server error"}
    assert any("SECRET-INTERNAL-DETAIL" in (r.exc_text or "") for r in caplog.records)


async def test_anthropic_headers_are_accepted() -> None:
    async with serve(api_keys=["sk-test"]) as api:
        headers = {**AUTH, "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14"}
        resp = await api.raw.post("/v1/messages", json=ask(QUESTION), headers=headers)
        assert resp.status_code == 200, resp.text
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api.asgi), base_url=API) as h2:
            # as Claude Code sends its key (ANTHROPIC_API_KEY): x-api-key
            claude_code = anthropic.AsyncAnthropic(
                api_key=None, base_url=API, default_headers=AUTH, http_client=h2, max_retries=0
            )
            out = await claude_code.messages.create(**ask(QUESTION))
        assert out.content[0].text == expected_reply(QUESTION)


async def test_a_worker_failing_mid_stream_is_resumed_elsewhere() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.all_workers(then="break", after=2)
    fleet.workers["b"].then = None
    async with serve(fleet) as api:
        for _ in range(2):  # whichever worker gets it first
            async with api.anthropic.messages.stream(**ask("one two three four five six")) as stream:
                text = "".join([t async for t in stream.text_stream])
                final = await stream.get_final_message()
            assert text == final.content[0].text == "one two three four five six"
            assert final.stop_reason == "end_turn" and final.usage.output_tokens == 6


async def test_a_failure_no_worker_can_make_up_for_is_an_error_event() -> None:
    fleet = Fleet({"echo": ["a"]})
    fleet.workers["a"].then, fleet.workers["a"].after = "error_chunk", 3
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/messages", json=ask("a b c d e f", stream=True), headers=AUTH)
        assert resp.status_code == 200
        events = events_of(resp.text)
        kinds = [kind for kind, _ in events]
        assert kinds[0] == "message_start" and kinds[-1] == "error" and "message_stop" not in kinds
        assert events[-1][1]["error"]["type"] == "api_error"
        with pytest.raises(anthropic.APIStatusError):
            async with api.anthropic.messages.stream(**ask("a b c d e f")) as stream:
                async for _ in stream:
                    pass


async def test_count_tokens_counts_the_prompt_a_generation_would_have() -> None:
    system = "Be brief."
    async with serve() as api:
        body = {"model": "echo", "system": system, "messages": [{"role": "user", "content": QUESTION}]}
        got = await api.anthropic.messages.count_tokens(**body, tools=[WEATHER])  # type: ignore[arg-type]
        (worker,) = api.fleet.workers.values()
        asked = worker.tokenized[-1]
        assert got.input_tokens == len((system + " " + QUESTION).split())
        await api.anthropic.messages.create(**body, max_tokens=8, tools=[WEATHER])  # type: ignore[arg-type]
        generated = worker.requests[-1]
        assert asked.messages == generated.messages and asked.tools == generated.tools
        resp = await api.raw.post("/v1/messages/count_tokens", json={**body, "tools": [WEATHER]}, headers=AUTH)
        validate("MessageTokensCount", resp.json())
        none = await api.raw.post(
            "/v1/messages/count_tokens", json={**body, "tools": [WEATHER], "tool_choice": {"type": "none"}}
        )
        assert none.status_code == 200 and worker.tokenized[-1].tools == []  # offered no tools, as generated


async def test_openapi_documents_the_routes_with_anthropics_error_body() -> None:
    async with serve() as api:
        schema = (await api.raw.get("/openapi.json")).json()
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            responses = schema["paths"][path]["post"]["responses"]
            assert "422" not in responses
            assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicError")
        assert not [name for name in schema["components"]["schemas"] if "anthropic__" in name]  # names of their own
