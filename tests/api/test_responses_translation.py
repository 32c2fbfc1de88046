"""The translation between the Responses API and the answer path, on its own: requests into chat request bodies
(messages, tools, tool_choice, text.format), the path's neutral deltas (text and tool-call pieces, whole or as
stream deltas) into output items and typed events by `ResponseRenderer`. Tool calls and JSON output are the
workers' to produce; this is what the Responses side makes of them, checked against OpenAI's published
schemas."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lmfleet.api.response_store import Stored
from lmfleet.api.responses import ResponseRenderer, earlier_items
from lmfleet.api.sse import Event
from lmfleet.api.upstream import ChoiceDelta
from lmfleet.protocol.openai import Usage
from lmfleet.protocol.responses import CreateResponseRequest, Response, chat_messages
from lmfleet.protocol.worker import ToolCallChunk
from tests.conformance import validate

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def request(**fields: Any) -> CreateResponseRequest:
    return CreateResponseRequest.model_validate({"input": "hi", **fields})


def test_function_calls_join_the_assistant_message_and_outputs_are_tool_messages() -> None:
    items = request(
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
            {"role": "assistant", "content": "Checking once more."},
            {"type": "function_call", "call_id": "c3", "name": "get_weather", "arguments": "{}"},
        ]
    ).input
    call = lambda cid, args: {  # noqa: E731
        "id": cid,
        "type": "function",
        "function": {"name": "get_weather", "arguments": args},
    }
    assert chat_messages(items) == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("c1", '{"city": "Paris"}'), call("c2", '{"city": "Rome"}')],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "rain"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Checking once more."}],
            "tool_calls": [call("c3", "{}")],
        },
    ]


def test_tools_tool_choice_and_text_format_become_the_chat_fields() -> None:
    body = request(
        instructions="Be brief.",
        tools=[WEATHER, {"type": "function", "name": "now"}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
        max_output_tokens=40,
        temperature=0.5,
    ).chat_body("m")
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "now"}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    assert (body["model"], body["max_completion_tokens"], body["temperature"]) == ("m", 40, 0.5)
    assert request(text={"format": {"type": "json_object"}}).chat_body("m")["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in request(text={"format": {"type": "text"}}).chat_body("m")
    for choice in ("auto", "none", "required"):
        assert request(tool_choice=choice).chat_body("m")["tool_choice"] == choice
    plain = request().chat_body("m")
    assert not {"tools", "tool_choice", "response_format", "parallel_tool_calls"} & set(plain)


def test_a_json_schema_format_needs_a_name_and_a_schema() -> None:
    with pytest.raises(ValidationError):
        request(text={"format": {"type": "json_schema", "schema": {"type": "object"}}})
    with pytest.raises(ValidationError):
        request(text={"format": {"type": "json_schema", "name": "x"}})


def fresh(**fields: Any) -> ResponseRenderer:
    req = request(**fields)
    return ResponseRenderer(Response(id="resp_1", created_at=1, model="m", store=True, **req.echoed()))


USAGE = Usage(prompt_tokens=10, completion_tokens=7, total_tokens=17)


def call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> tuple[ToolCallChunk]:
    return (ToolCallChunk(index=index, id=call_id, name=name, arguments=arguments),)


def test_streamed_text_then_tool_calls_become_a_message_then_function_calls() -> None:
    renderer = fresh(tools=[WEATHER])
    sent: list[Event] = renderer.start(USAGE)
    deltas = [  # the pieces of tool calls as the worker streams them
        ChoiceDelta(0, text="Let me check."),
        ChoiceDelta(0, tool_calls=call(0, "", call_id="call_a", name="get_weather")),
        ChoiceDelta(0, tool_calls=call(0, '{"city": ')),
        ChoiceDelta(0, tool_calls=call(0, '"Paris"}')),
        ChoiceDelta(0, tool_calls=call(1, "{}", call_id="call_b", name="get_weather"), finish_reason="tool_calls"),
    ]
    for delta in deltas:
        sent += renderer.delta(delta)
    sent += renderer.end(USAGE)
    events = [e.data for e in sent]
    assert [e.type for e in sent] == [getattr(e, "type", None) for e in events]  # sent as `event: <its type>`
    wire = [e.model_dump(mode="json") for e in events]
    for event in wire:
        validate("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in wire] == list(range(len(wire)))
    assert [e["type"] for e in wire] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",  # the text is complete once a call begins
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = wire[-1]["response"]
    validate("Response", final)
    message, first, second = final["output"]
    assert message["content"][0]["text"] == "Let me check." and message["status"] == "completed"
    assert (first["type"], first["call_id"], first["name"], first["arguments"]) == (
        "function_call",
        "call_a",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert (second["call_id"], second["arguments"], second["status"]) == ("call_b", "{}", "completed")
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 17
    assert final["tools"][0]["name"] == "get_weather"
    assert wire[8]["item"]["arguments"] == "" and wire[8]["output_index"] == 1  # added before its arguments


def test_a_whole_answer_with_tool_calls_becomes_the_same_output() -> None:
    pieces = (
        ToolCallChunk(index=0, id="call_a", name="get_weather", arguments="{}"),
        ToolCallChunk(index=1, id="call_b", name="now"),
    )
    response = fresh().answer([ChoiceDelta(0, tool_calls=pieces, finish_reason="tool_calls")], USAGE)
    wire = response.model_dump(mode="json")
    validate("Response", wire)
    assert [(o["type"], o["call_id"], o["name"]) for o in wire["output"]] == [
        ("function_call", "call_a", "get_weather"),
        ("function_call", "call_b", "now"),
    ]
    # the next turn sends them back to the chat path as the assistant's tool calls
    stored = Stored(
        wire, [{"type": "message", "id": "msg_0", "role": "user", "content": [{"type": "input_text", "text": "q"}]}]
    )
    messages = chat_messages(earlier_items(stored))
    assert messages[1]["role"] == "assistant" and [c["id"] for c in messages[1]["tool_calls"]] == ["call_a", "call_b"]


def test_a_json_answer_is_text_and_an_empty_answer_an_empty_message() -> None:
    text = [ChoiceDelta(0, text='{"a": 1}', finish_reason="stop")]
    json_format = {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}
    wire = fresh(text=json_format).answer(text, USAGE).model_dump(mode="json")
    validate("Response", wire)
    assert wire["output"][0]["content"][0]["text"] == '{"a": 1}'
    assert wire["text"]["format"]["schema"] == {"type": "object"}  # echoed as OpenAI names it
    wire = fresh().answer([ChoiceDelta(0, finish_reason="stop")], USAGE).model_dump(mode="json")
    assert [o["content"][0]["text"] for o in wire["output"]] == [""]
