"""Anthropic's Messages API without HTTP: a request's translation into the chat request it is generated as
(lmfleet.protocol.anthropic), and the renderer turning the answer path's deltas into a message and its events
(lmfleet.api.messages)."""

from __future__ import annotations

import json

from lmfleet.api.messages import MessageRenderer, chat_request
from lmfleet.api.upstream import ChoiceDelta, joined
from lmfleet.protocol.anthropic import MessagesRequest, anthropic_loc, tool_input
from lmfleet.protocol.openai import Usage
from lmfleet.protocol.worker import ToolCallChunk
from tests.conformance.anthropic import EVENTS, validate

USAGE = Usage(prompt_tokens=10, completion_tokens=7, total_tokens=17)
ASK = {"role": "user", "content": "hi"}
WEATHER = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def call(index: int, arguments: str, call_id: str | None = None, name: str | None = None) -> tuple[ToolCallChunk]:
    return (ToolCallChunk(index=index, id=call_id, name=name, arguments=arguments),)


def test_a_claude_code_like_request_is_the_chat_request_it_means() -> None:
    body = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "list files"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Listing."},
                        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py\nb.py", "is_error": False},
                        {"type": "text", "text": "which is bigger?", "cache_control": {"type": "ephemeral"}},
                    ],
                },
            ],
            "tools": [{**WEATHER, "name": "Bash", "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "metadata": {"user_id": "someone"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "stream": True,
        }
    )
    chat = chat_request(body)
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "You are an agent."),
        ("user", "list files"),
        ("assistant", "Listing."),
        ("tool", "a.py\nb.py"),
        ("user", "which is bigger?"),
    ]
    (sent_call,) = chat.messages[2].tool_calls or []
    assert sent_call.id == "toolu_1" and json.loads(sent_call.function.arguments) == {"command": "ls"}
    assert chat.messages[3].tool_call_id == "toolu_1"
    assert chat.max_completion_tokens == 100 and chat.stream and chat.parallel_tool_calls is False
    assert chat.tool_choice == "auto" and [t.function.name for t in chat.tools or []] == ["Bash"]
    assert chat.chat_template_kwargs is None  # thinking enabled: the model as it is


def test_thinking_blocks_go_back_as_reasoning_and_disabled_thinking_reaches_the_template() -> None:
    body = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 100,
            "messages": [
                {"role": "user", "content": "list files"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "I should list ", "signature": ""},
                        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
                        {"type": "thinking", "thinking": "them.", "signature": "unchecked"},
                        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}]},
            ],
            "tools": [{**WEATHER, "name": "Bash"}],
            "thinking": {"type": "disabled"},
        }
    )
    chat = chat_request(body)
    turn = chat.messages[1]
    assert (turn.role, turn.content, turn.reasoning_content) == ("assistant", None, "I should list them.")
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    without = chat_request(MessagesRequest.model_validate({"model": "m", "max_tokens": 1, "messages": [ASK]}))
    assert without.chat_template_kwargs is None


def test_reasoning_is_a_thinking_block_before_the_answer() -> None:
    streamed, whole = MessageRenderer("m"), MessageRenderer("m")
    deltas = [
        ChoiceDelta(0, reasoning="Paris? "),
        ChoiceDelta(0, reasoning="Check."),
        ChoiceDelta(0, text="Checking."),
        ChoiceDelta(0, tool_calls=call(0, '{"city": "Paris"}', call_id="call_a", name="get_weather")),
        ChoiceDelta(0, finish_reason="tool_calls"),
    ]
    events = [*streamed.start(USAGE), *(e for d in deltas for e in streamed.delta(d)), *streamed.end(USAGE)]
    data = [e.data.model_dump(mode="json") for e in events]  # type: ignore[union-attr]
    for payload in data:
        validate(EVENTS[payload["type"]], payload)
    assert data[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    }
    assert [d["delta"] for d in data[2:4]] == [
        {"type": "thinking_delta", "thinking": "Paris? "},
        {"type": "thinking_delta", "thinking": "Check."},
    ]
    assert [(d["type"], d.get("index")) for d in data[4:6]] == [("content_block_stop", 0), ("content_block_start", 1)]
    message = whole.answer([joined(deltas)], USAGE)
    assert message.model_dump(exclude={"id"}) == streamed.message.model_dump(exclude={"id"})
    validate("Message", message.model_dump(mode="json"))
    assert [b.model_dump() for b in message.content] == [
        {"type": "thinking", "thinking": "Paris? Check.", "signature": ""},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
    ]


def test_chat_parameters_are_named_the_messages_way() -> None:
    assert anthropic_loc(("max_completion_tokens",)) == ("max_tokens",)
    assert anthropic_loc(("stop", 2)) == ("stop_sequences", 2)
    assert anthropic_loc(("tools", 1, "function", "name")) == ("tools", 1, "name")
    assert anthropic_loc(("tools", 0, "function", "parameters", "type")) == ("tools", 0, "input_schema", "type")
    assert anthropic_loc(("messages", 4, "content")) == ("messages",)  # chat message 4 is not Anthropic's 4th
    assert anthropic_loc(("response_format", "json_schema")) == ("output_config", "format")
    assert anthropic_loc(("temperature",)) == ("temperature",)


def test_text_then_tool_calls_stream_as_blocks_one_after_another() -> None:
    streamed, whole = MessageRenderer("m"), MessageRenderer("m")
    deltas = [
        ChoiceDelta(0, text="Let me"),
        ChoiceDelta(0, text=" check."),
        ChoiceDelta(0, tool_calls=call(0, "", call_id="call_a", name="get_weather")),
        ChoiceDelta(0, tool_calls=call(0, '{"city": ')),
        ChoiceDelta(0, tool_calls=call(0, '"Paris"}')),
        ChoiceDelta(0, tool_calls=call(1, "{}", call_id="call_b", name="get_weather"), finish_reason="tool_calls"),
    ]
    events = [*streamed.start(USAGE), *(e for d in deltas for e in streamed.delta(d)), *streamed.end(USAGE)]
    data = [e.data.model_dump(mode="json") for e in events]  # type: ignore[union-attr]
    for event, payload in zip(events, data, strict=True):
        assert event.type == payload["type"]
        validate(EVENTS[payload["type"]], payload)
    where = [(d["type"], d.get("index")) for d in data]
    assert where == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert data[0]["message"]["usage"]["input_tokens"] == 10 and data[0]["message"]["stop_reason"] is None
    assert data[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    message = whole.answer([joined(deltas)], USAGE)
    assert message.model_dump(exclude={"id"}) == streamed.message.model_dump(exclude={"id"})
    validate("Message", message.model_dump(mode="json"))
    assert [b.model_dump() for b in message.content] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {}},
    ]


def test_a_stop_string_is_the_stop_sequence_and_a_cut_call_reads_as_the_sdk_reads_it() -> None:
    message = MessageRenderer("m").answer([ChoiceDelta(0, text="a b", finish_reason="stop", stop_string="c")], USAGE)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "c")
    assert (
        MessageRenderer("m").answer([ChoiceDelta(0, text="a", finish_reason="stop")], USAGE).stop_reason == "end_turn"
    )
    assert tool_input('{"city": "Par') == {}  # an unfinished string is left out, as jiter's partial mode does
    assert tool_input('{"city": "Paris", "days": [1, 2') == {"city": "Paris", "days": [1, 2]}
    assert tool_input("[1]") == {} and tool_input("") == {} and tool_input("not json") == {}
