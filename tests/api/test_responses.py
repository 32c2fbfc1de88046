"""`/v1/responses` as OpenAI clients use it: the official client's `responses.create` / `responses.stream`, plain
HTTP where the wire matters, against `create_app` in process with fake workers (tests/api/fakes.py). Every body
and every streamed event is checked against OpenAI's published schemas (tests/conformance)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from lmfleet.protocol.openai import ChatCompletionRequest, ChatMessage
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest
from tests.conformance import validate

from .fakes import Fleet, assert_error, expected_reply, serve

QUESTION = "What is deep learning?"


def events_of(text: str) -> list[dict[str, Any]]:
    """The events of a Responses SSE body: `event: <type>` and `data: {json}` per event, the types matching."""
    out = []
    for block in (b for b in text.split("\n\n") if b.strip()):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == kind.removeprefix("event: ")
        out.append(event)
    return out


def worker_messages(fleet: Fleet) -> list[tuple[str, str | None]]:
    """What the (single) fake worker was last asked, as (role, content) pairs."""
    (worker,) = fleet.workers.values()
    return [(m.role, m.content) for m in worker.requests[-1].messages or []]


async def test_create_with_the_official_client() -> None:
    async with serve() as api:
        out = await api.openai.responses.create(model="echo", input=QUESTION, instructions="Be brief.")
        assert out.object == "response" and out.id.startswith("resp_") and out.model == "echo"
        assert out.status == "completed" and out.error is None and out.incomplete_details is None
        assert out.output_text == expected_reply(QUESTION)
        (message,) = out.output
        assert message.type == "message" and message.role == "assistant" and message.status == "completed"
        assert out.usage.input_tokens == 4 and out.usage.output_tokens == 4 and out.usage.total_tokens == 8
        assert out.instructions == "Be brief." and out.store is True and out.temperature == 1.0
        # instructions are a system message first; the input a user message
        assert worker_messages(api.fleet) == [("system", "Be brief."), ("user", QUESTION)]


async def test_input_items_become_chat_messages() -> None:
    items = [
        {"role": "developer", "content": "Answer in words."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "one two"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "three", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "four"}, {"type": "input_text", "text": "five"}]},
    ]
    async with serve() as api:
        out = await api.openai.responses.create(
            model="echo", input=items, temperature=0, top_p=0.5, metadata={"k": "v"}
        )
        assert worker_messages(api.fleet) == [
            ("system", "Answer in words."),  # developer means system to a chat template
            ("user", "one two"),
            ("assistant", "three"),
            ("user", "four\nfive"),  # text parts joined as the chat path joins them
        ]
        (worker,) = api.fleet.workers.values()
        assert worker.requests[-1].temperature == 0 and worker.requests[-1].top_p == 0.5
        assert out.metadata == {"k": "v"} and out.top_p == 0.5


async def test_stream_events_in_order_and_equal_to_the_whole_answer() -> None:
    async with serve() as api:
        whole = await api.openai.responses.create(model="echo", input=QUESTION)
        events = [e async for e in await api.openai.responses.create(model="echo", input=QUESTION, stream=True)]
        kinds = [e.type for e in events]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert set(kinds[4:-4]) == {"response.output_text.delta"}
        assert [e.sequence_number for e in events] == list(range(len(events)))
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response
        assert streamed == final.output_text == whole.output_text == expected_reply(QUESTION)
        assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}
        item_id = events[2].item.id
        assert {getattr(e, "item_id", item_id) for e in events} == {item_id} == {final.output[0].id}
        assert final.status == "completed" and final.usage.total_tokens == 8


async def test_stream_helper_gives_the_final_response() -> None:
    async with serve() as api:
        async with api.openai.responses.stream(model="echo", input="a b c d") as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        assert "".join(deltas) == final.output_text == "a b c d"


async def test_max_output_tokens_makes_an_incomplete_response() -> None:
    async with serve() as api:
        out = await api.openai.responses.create(model="echo", input="a b c d e", max_output_tokens=2)
        assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
        assert out.output_text == "a b" and out.output[0].status == "incomplete" and out.completed_at is None
        stream = await api.openai.responses.create(model="echo", input="a b c", max_output_tokens=1, stream=True)
        events = [e async for e in stream]
        assert events[-1].type == "response.incomplete" and events[-1].response.output_text == "a"
        assert events[-2].type == "response.output_item.done" and events[-2].item.status == "incomplete"


async def test_bodies_and_every_event_validate_against_openais_schemas() -> None:
    async with serve() as api:
        body = {"model": "echo", "input": QUESTION, "max_output_tokens": 3, "metadata": {"a": "b"}, "user": "u1"}
        resp = await api.raw.post("/v1/responses", json=body)
        validate("Response", resp.json())
        for stream_body in ({**body, "stream": True}, {"model": "echo", "input": "x y", "stream": True}):
            events = events_of((await api.raw.post("/v1/responses", json=stream_body)).text)
            for event in events:
                validate("ResponseStreamEvent", event)
        created = events[0]["response"]
        assert created["status"] == "in_progress" and created["output"] == [] and "usage" not in created
        items = await api.raw.get(f"/v1/responses/{resp.json()['id']}/input_items")
        validate("ResponseItemList", items.json())
        validate("Response", (await api.raw.get(f"/v1/responses/{resp.json()['id']}")).json())


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"tools": [{"type": "function", "name": "f"}, {"type": "file_search"}]}, "tools.1"),
        ({"background": True}, "background"),
        ({"reasoning": {"context": "all_turns"}}, "reasoning.context"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"text": {"verbosity": "high"}}, "text.verbosity"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
        ({"input": 5}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ],
)
async def test_what_lmfleet_cannot_do_is_a_400_naming_it(extra: dict[str, Any], param: str) -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": QUESTION, **extra})
        assert_error(resp, 400, param=param, type_="invalid_request_error")
        validate("ErrorResponse", resp.json())
        assert not api.fleet.workers["a"].requests  # refused before any worker was asked


async def test_settings_that_change_nothing_are_accepted() -> None:
    async with serve() as api:
        out = await api.openai.responses.create(
            model="echo",
            input=QUESTION,
            include=[],
            reasoning={},
            truncation="disabled",
            service_tier="auto",
            prompt_cache_key="k",
            safety_identifier="s",
            text={"format": {"type": "text"}, "verbosity": "medium"},
            tool_choice="none",
            background=False,
        )
        assert out.output_text == expected_reply(QUESTION)


async def test_empty_input_and_unknown_model() -> None:
    async with serve() as api:
        assert_error(await api.raw.post("/v1/responses", json={"model": "echo", "input": []}), 400, param="input")
        assert_error(await api.raw.post("/v1/responses", json={"model": "echo"}), 400, param="input")
        resp = await api.raw.post("/v1/responses", json={"model": "nope", "input": "hi"})
        assert_error(resp, 404, param="model", code="model_not_found")
        with pytest.raises(openai.NotFoundError):
            await api.openai.responses.create(model="nope", input="hi")


async def test_the_chat_paths_limits_apply_under_responses_names() -> None:
    async with serve() as api:  # the default limits: a message of 1M characters at most
        big = "a " * 600_000
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": big})
        err = assert_error(resp, 400, param="input")
        assert "characters" in err["message"]


async def test_a_worker_failing_mid_stream_is_resumed_elsewhere() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 2
    fleet.workers["b"].then, fleet.workers["b"].after = "break", 2
    async with serve(fleet) as api:
        fleet.workers["b"].then = None  # whichever starts, b can finish
        events = [e async for e in await api.openai.responses.create(model="echo", input="a b c d e f", stream=True)]
        assert events[-1].type == "response.completed"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "a b c d e f"


async def test_a_failure_no_worker_can_make_up_for_ends_the_stream_with_failed() -> None:
    fleet = Fleet({"echo": ["a"]})
    fleet.workers["a"].then, fleet.workers["a"].after = "error_chunk", 2
    async with serve(fleet) as api:
        events = events_of(
            (await api.raw.post("/v1/responses", json={"model": "echo", "input": "a b c", "stream": True})).text
        )
        for event in events:
            validate("ResponseStreamEvent", event)
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert failed["output"][0]["status"] == "incomplete"  # what was said before the failure is kept
        # a failure before the first token is a plain JSON error, as for chat
        fleet.workers["a"].reject = (503, {"error": {"message": "down", "type": "x", "param": None, "code": None}})
        assert_error(await api.raw.post("/v1/responses", json={"model": "echo", "input": "a"}), 503)


# ---------------------------------------------------------------------------------------------------------------
# store / previous_response_id


async def test_previous_response_id_continues_the_conversation() -> None:
    async with serve() as api:
        first = await api.openai.responses.create(model="echo", input="one two", instructions="Only once.")
        second = await api.openai.responses.create(model="echo", input="three", previous_response_id=first.id)
        assert second.previous_response_id == first.id and second.instructions is None
        # the earlier input and output come first; the earlier instructions are not carried over
        assert worker_messages(api.fleet) == [("user", "one two"), ("assistant", "one two"), ("user", "three")]
        third = await api.openai.responses.create(
            model="echo", input="four", previous_response_id=second.id, instructions="New."
        )
        assert worker_messages(api.fleet) == [
            ("system", "New."),
            ("user", "one two"),
            ("assistant", "one two"),
            ("user", "three"),
            ("assistant", "three"),
            ("user", "four"),
        ]
        assert third.output_text == "four"


async def test_a_streamed_response_is_stored_before_its_last_event() -> None:
    async with serve() as api:
        async for event in await api.openai.responses.create(model="echo", input="a b", stream=True):
            if event.type == "response.completed":
                stored = await api.openai.responses.retrieve(event.response.id)  # the stream is still open
                assert stored.output_text == "a b" and stored.status == "completed"
                follow = await api.openai.responses.create(model="echo", input="c", previous_response_id=stored.id)
                assert follow.output_text == "c"


async def test_a_response_that_cannot_be_stored_fails_instead_of_ending_well(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmfleet.api.response_store import ResponseStore

    async def broken(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ResponseStore, "put", broken)
    async with serve() as api:
        events = events_of(
            (await api.raw.post("/v1/responses", json={"model": "echo", "input": "a b", "stream": True})).text
        )
        assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
        assert events[-1]["response"]["error"]["message"] == "the response could not be stored"
        assert "response.completed" not in [e["type"] for e in events]
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": "a b"})
        assert assert_error(resp, 500)["message"] == "the response could not be stored"
        unstored = await api.openai.responses.create(model="echo", input="a b", store=False)  # nothing to store
        assert unstored.output_text == "a b"


async def test_retrieve_delete_and_input_items() -> None:
    async with serve() as api:
        items = [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "x y"},
        ]
        first = await api.openai.responses.create(model="echo", input=items)
        got = await api.openai.responses.retrieve(first.id)
        assert got.model_dump() == first.model_dump()
        listed = (await api.raw.get(f"/v1/responses/{first.id}/input_items")).json()
        assert [i["content"][0]["text"] for i in listed["data"]] == ["x y", "two", "one"]  # newest first
        assert [i["type"] for i in listed["data"]] == ["message"] * 3 and not listed["has_more"]
        assert listed["data"][1]["content"][0]["type"] == "output_text"
        page = (await api.raw.get(f"/v1/responses/{first.id}/input_items?order=asc&limit=2")).json()
        assert [i["content"][0]["text"] for i in page["data"]] == ["one", "two"] and page["has_more"]
        rest = (await api.raw.get(f"/v1/responses/{first.id}/input_items?order=asc&after={page['last_id']}")).json()
        assert [i["content"][0]["text"] for i in rest["data"]] == ["x y"] and not rest["has_more"]
        client_items = await api.openai.responses.input_items.list(first.id, order="asc")
        assert [i.id for i in client_items.data] == [i["id"] for i in reversed(listed["data"])]

        # a continued response lists the conversation it was generated from: earlier input, earlier output, new input
        second = await api.openai.responses.create(model="echo", input="z", previous_response_id=first.id)
        later = (await api.raw.get(f"/v1/responses/{second.id}/input_items?order=asc")).json()
        assert [i["content"][0]["text"] for i in later["data"]] == ["one", "two", "x y", "x y", "z"]
        assert later["data"][3]["id"] == first.output[0].id

        deleted = await api.raw.delete(f"/v1/responses/{first.id}")
        assert deleted.json() == {"id": first.id, "object": "response", "deleted": True}
        assert_error(await api.raw.get(f"/v1/responses/{first.id}"), 404, param="response_id")
        assert_error(await api.raw.delete(f"/v1/responses/{first.id}"), 404, param="response_id")
        assert_error(await api.raw.get(f"/v1/responses/{first.id}/input_items"), 404, param="response_id")
        resp = await api.raw.post(
            "/v1/responses", json={"model": "echo", "input": "a", "previous_response_id": first.id}
        )
        assert_error(resp, 400, param="previous_response_id", code="previous_response_not_found")
        # the response that continued it does not depend on it
        third = await api.openai.responses.create(model="echo", input="w", previous_response_id=second.id)
        assert third.output_text == "w" and worker_messages(api.fleet)[0] == ("user", "one")


async def test_store_false_keeps_nothing() -> None:
    async with serve() as api:
        out = await api.openai.responses.create(model="echo", input="a", store=False)
        assert out.store is False
        assert_error(await api.raw.get(f"/v1/responses/{out.id}"), 404, param="response_id")
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": "b", "previous_response_id": out.id})
        assert_error(resp, 400, param="previous_response_id", code="previous_response_not_found")


async def test_storage_turned_off() -> None:
    async with serve(responses_db=None) as api:
        out = await api.openai.responses.create(model="echo", input="a")
        assert out.store is False and out.output_text == "a"
        assert_error(await api.raw.get(f"/v1/responses/{out.id}"), 404, param="response_id")
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": "b", "previous_response_id": out.id})
        assert_error(resp, 400, param="previous_response_id")


async def test_stored_responses_belong_to_the_key_that_made_them() -> None:
    async with serve(api_keys=["key-one", "key-two"], api_key="key-one") as api:
        out = await api.openai.responses.create(model="echo", input="a b")
        two = {"Authorization": "Bearer key-two"}
        assert_error(await api.raw.get(f"/v1/responses/{out.id}", headers=two), 404, param="response_id")
        assert_error(await api.raw.delete(f"/v1/responses/{out.id}", headers=two), 404, param="response_id")
        body = {"model": "echo", "input": "c", "previous_response_id": out.id}
        assert_error(await api.raw.post("/v1/responses", json=body, headers=two), 400, param="previous_response_id")
        assert_error(await api.raw.get(f"/v1/responses/{out.id}"), 401)  # no key at all
        assert (await api.openai.responses.retrieve(out.id)).output_text == "a b"
        # the same key sent as Anthropic's clients send it is the same owner; another key in it is not
        mine = await api.raw.get(f"/v1/responses/{out.id}", headers={"x-api-key": "key-one"})
        assert mine.status_code == 200 and mine.json()["id"] == out.id
        theirs = await api.raw.get(f"/v1/responses/{out.id}", headers={"x-api-key": "key-two"})
        assert_error(theirs, 404, param="response_id")


async def test_the_database_survives_a_restart(tmp_path) -> None:  # noqa: ANN001
    db = tmp_path / "state" / "responses.sqlite3"
    async with serve(responses_db=str(db)) as api:
        first = await api.openai.responses.create(model="echo", input="one two")
    assert db.stat().st_mode & 0o077 == 0  # prompts and answers: owner-only
    async with serve(responses_db=str(db)) as api:
        assert (await api.openai.responses.retrieve(first.id)).output_text == "one two"
        await api.openai.responses.create(model="echo", input="three", previous_response_id=first.id)
        assert worker_messages(api.fleet) == [("user", "one two"), ("assistant", "one two"), ("user", "three")]


# ---------------------------------------------------------------------------------------------------------------
# Tools and structured output ride on the chat path's support


def chat_path_accepts(**fields: Any) -> bool:
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **fields})
    except ValueError:
        return False
    return True


TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
CHAT_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
JSON_FORMAT = {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}
CHAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}}
HAS_TOOL_CALLS = "tool_calls" in GenerateChunk.model_fields  # the chat path parses tool calls (branch structured)


@pytest.mark.parametrize(
    ("extra", "chat_fields", "param", "sent"),
    [
        ({"tools": [TOOL]}, {"tools": [CHAT_TOOL]}, "tools", ("tools", [{"name": "get_weather"}])),
        ({"text": {"format": JSON_FORMAT}}, {"response_format": CHAT_FORMAT}, "text.format", ("json_schema", {})),
        (
            {"tools": [TOOL], "tool_choice": "required"},
            {"tools": [CHAT_TOOL], "tool_choice": "required"},
            "tools",
            ("tool_choice", "required"),
        ),
    ],
)
async def test_tools_and_formats_go_as_far_as_the_chat_path_goes(
    extra: dict[str, Any], chat_fields: dict[str, Any], param: str, sent: tuple[str, Any]
) -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": QUESTION, **extra})
        if chat_path_accepts(**chat_fields):
            assert resp.status_code == 200, resp.text
            field, expected = sent  # the worker was asked for it (the fake worker itself ignores it)
            got = api.fleet.workers["a"].requests[-1].model_dump()[field]
            if isinstance(expected, list):
                assert [{k: t[k] for k in e} for t, e in zip(got, expected, strict=True)] == expected
            else:
                assert got == expected or (isinstance(expected, dict) and got)
        else:  # the chat path's own refusal, under the Responses parameter's name
            assert_error(resp, 400, param=param)


async def test_function_call_items_go_as_far_as_the_chat_path_goes() -> None:
    items = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    async with serve() as api:
        resp = await api.raw.post("/v1/responses", json={"model": "echo", "input": items, "tools": [TOOL]})
        if "tool_calls" in ChatMessage.model_fields and chat_path_accepts(tools=[CHAT_TOOL]):
            assert resp.status_code == 200, resp.text
            roles = [m.role for m in api.fleet.workers["a"].requests[-1].messages or []]
            assert roles == ["user", "assistant", "tool"]
        else:  # never silently dropped
            assert_error(resp, 400, param="tools")
            no_tools = await api.raw.post("/v1/responses", json={"model": "echo", "input": items})
            assert_error(no_tools, 400, param="input")


def calling_worker(fleet: Fleet) -> None:
    """The fleet's worker answers with a little text, then two tool calls in pieces, as the chat path streams them."""
    worker = fleet.workers["a"]

    def chunks(req: GenerateRequest) -> list[GenerateChunk]:
        base = {"request_id": req.request_id, "prompt_tokens": 3, "prompt_token_ids": [1, 2, 3]}
        pieces = [
            {"text": "Checking.", "token_ids": [1]},
            {"tool_calls": [{"index": 0, "id": "call_a", "name": "get_weather", "arguments": '{"city": '}]},
            {"tool_calls": [{"index": 0, "arguments": '"Paris"}'}]},
            {"tool_calls": [{"index": 1, "id": "call_b", "name": "get_weather", "arguments": "{}"}]},
        ]
        out = [GenerateChunk.model_validate({**base, **p, "completion_tokens": i}) for i, p in enumerate(pieces, 1)]
        out[-1].finish_reason = "tool_calls"
        return out

    worker.chunks = chunks  # type: ignore[method-assign]


@pytest.mark.skipif(not HAS_TOOL_CALLS, reason="the chat path has no tool calls yet (branch structured)")
async def test_tool_calls_of_the_chat_path_become_function_call_items() -> None:
    fleet = Fleet({"echo": ["a"]})
    calling_worker(fleet)
    async with serve(fleet) as api:
        out = await api.openai.responses.create(model="echo", input="weather?", tools=[TOOL])
        assert [o.type for o in out.output] == ["message", "function_call", "function_call"]
        assert out.output_text == "Checking." and out.status == "completed"
        calls = [(o.call_id, o.name, o.arguments) for o in out.output[1:]]
        assert calls == [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_weather", "{}")]
        validate("Response", (await api.raw.get(f"/v1/responses/{out.id}")).json())
        async with api.openai.responses.stream(model="echo", input="weather?", tools=[TOOL]) as stream:
            kinds = [e.type async for e in stream]
            final = await stream.get_final_response()
        assert kinds.count("response.function_call_arguments.done") == 2
        assert [(o.call_id, o.arguments) for o in final.output[1:]] == [(c[0], c[2]) for c in calls]
        # the client runs its functions and continues: the calls and their outputs go back as chat messages
        outputs = [{"type": "function_call_output", "call_id": c[0], "output": "sunny"} for c in calls]
        await api.openai.responses.create(model="echo", input=outputs, previous_response_id=out.id, tools=[TOOL])
        sent = fleet.workers["a"].requests[-1].messages or []
        assert [m.role for m in sent] == ["user", "assistant", "tool", "tool"]
        assert [c["id"] for c in sent[1].model_dump()["tool_calls"]] == ["call_a", "call_b"]


async def test_an_openai_agents_sdk_agent_gets_its_answer() -> None:
    """The OpenAI Agents SDK's Responses model, pointed at lmfleet, tracing off (nothing leaves the process)."""
    from agents import Agent, OpenAIResponsesModel, RunConfig, Runner

    async with serve() as api:
        model = OpenAIResponsesModel(model="echo", openai_client=api.openai)
        agent = Agent(name="echo", instructions="Repeat the words.", model=model)
        result = await Runner.run(agent, "one two three", run_config=RunConfig(tracing_disabled=True))
        assert result.final_output == "one two three"
        assert worker_messages(api.fleet) == [("system", "Repeat the words."), ("user", "one two three")]
        streamed = Runner.run_streamed(agent, "four five", run_config=RunConfig(tracing_disabled=True))
        async for _ in streamed.stream_events():
            pass
        assert streamed.final_output == "four five"


async def test_no_prompt_or_answer_text_in_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    secret = "zebra-quartz-secret"
    fleet = Fleet({"echo": ["a"]})
    async with serve(fleet) as api:
        with caplog.at_level("DEBUG"):
            first = await api.openai.responses.create(model="echo", input=f"{secret} one", instructions=secret)
            async for _ in await api.openai.responses.create(
                model="echo", input=f"{secret} two", previous_response_id=first.id, stream=True
            ):
                pass
            await api.raw.post("/v1/responses", json={"model": "echo", "input": secret, "tools": [{"type": "x"}]})
            fleet.workers["a"].then, fleet.workers["a"].after = "error_chunk", 2
            await api.raw.post("/v1/responses", json={"model": "echo", "input": f"{secret} three", "stream": True})
    # the server side's records: the openai client's own debug log may show the request it sends
    served = [caplog.handler.format(r) for r in caplog.records if not r.name.startswith("openai")]
    assert served and not [line for line in served if secret in line]
