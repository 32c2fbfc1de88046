"""Reasoning models through the whole stack in one process: the real API app, the real controller app and two real
worker apps whose model thinks before it answers (a scripted engine behind the byte tokenizer and a chat template
that thinks: tests/fakes.py ThinkingTokenizer; no reasoning model installs offline here), driven by the official
`openai` client (and the official `anthropic` one). Chat answers carry the reasoning in `reasoning_content` (and
`reasoning`) and never the tags in `content`; streamed equals whole; Responses has a `reasoning` item, checked against
OpenAI's published schemas; Messages a `thinking` block, checked against Anthropic's;
`enable_thinking: false` and `reasoning_effort` reach the template; a JSON schema or a tool call applies after the
reasoning; a stream cut inside the reasoning or inside its closing tag resumes on the other worker with nothing
repeated or missing; completions keep the raw text."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from fastapi import FastAPI

from lmfleet.engine.base import LoadedModel
from lmfleet.worker.app import create_app as create_worker
from tests.api.test_messages import events_of as anthropic_events
from tests.api.test_responses import events_of
from tests.conformance import anthropic as anthropic_schemas
from tests.conformance import validate
from tests.fakes import ScriptedEngine, ThinkingTokenizer
from tests.test_stack import API, Cut, open_stack, worker_settings

pytestmark = pytest.mark.timeout(60)

THOUGHT = "\nIs 1 < 2? {yes} </thinking aloud> ünï 🙂\n"
ANSWER = "\n\nThe answer is yes ✓."
SCRIPT = f"<think>{THOUGHT}</think>{ANSWER}"  # what the model writes after the chat template's generation prompt
ASK = [{"role": "user", "content": "Is 1 < 2?"}]


class LoggedTokenizer(ThinkingTokenizer):
    """Adds itself to `log` each time it renders a chat prompt."""

    def __init__(self, style: str, log: list[ThinkingTokenizer]) -> None:
        super().__init__(style)
        self._log = log

    def render_chat(self, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
        self._log.append(self)
        return super().render_chat(messages, **kw)


@dataclass
class Stack:
    client: openai.AsyncOpenAI
    raw: httpx.AsyncClient
    cut: Cut
    renders: list[ThinkingTokenizer]  # the tokenizer of the worker that rendered each chat prompt, in order

    def rendered(self) -> ThinkingTokenizer:
        """The tokenizer that rendered the last chat prompt."""
        return self.renders[-1]

    def claude(self) -> anthropic.AsyncAnthropic:
        """Anthropic's official client, over the openai client's HTTP client (to the same API app)."""
        return anthropic.AsyncAnthropic(api_key="none", base_url=API, http_client=self.client._client, max_retries=0)


@contextlib.asynccontextmanager
async def thinker(style: str = "qwen3", script: str = SCRIPT) -> AsyncIterator[Stack]:
    renders: list[ThinkingTokenizer] = []

    def worker(name: str, http: httpx.AsyncClient) -> FastAPI:
        engine = ScriptedEngine(script, max_model_len=1024, step_s=0.002, after=b"assistant:")
        tokenizer = LoggedTokenizer(style, renders)
        settings = worker_settings(name, model_path="/models/thinker.gguf")
        return create_worker(settings, load=lambda _s: LoadedModel(engine, tokenizer), http_client=http)

    async with contextlib.AsyncExitStack() as exits:
        client, raw, cut = await open_stack(exits, worker)
        yield Stack(client, raw, cut, renders)


def expected(style: str) -> tuple[str, str, int]:
    """The reasoning, the answer and the reasoning's tokens (bytes, tags included) the model gives in `style`: a
    DeepSeek-R1 template writes `<think>\\n` itself, and the model goes on after it."""
    written = SCRIPT.removeprefix("<think>\n" if style == "deepseek_r1" else "")
    thought = THOUGHT.removeprefix("\n" if style == "deepseek_r1" else "")
    return thought, ANSWER, len(written.encode()) - len(ANSWER.encode())


async def chat_stream(client: openai.AsyncOpenAI, **kw: Any) -> tuple[str, str, list[Any]]:
    stream = await client.chat.completions.create(
        model="thinker", messages=ASK, stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = [c async for c in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert thought == "".join(getattr(d, "reasoning", None) or "" for d in deltas)  # both names, the same text
    return thought, "".join(d.content or "" for d in deltas), chunks


@pytest.mark.parametrize("style", ["qwen3", "deepseek_r1"])
async def test_chat_reasoning_whole_and_streamed(style: str) -> None:
    thought, answer, reasoning_tokens = expected(style)
    async with thinker(style) as stack:
        whole = await stack.client.chat.completions.create(model="thinker", messages=ASK)
        message = whole.choices[0].message
        assert (message.reasoning_content, message.reasoning, message.content) == (thought, thought, answer)
        assert whole.usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
        assert whole.usage.completion_tokens == len(SCRIPT.encode()) - (8 if style == "deepseek_r1" else 0)

        streamed, content, chunks = await chat_stream(stack.client)
        assert (streamed, content) == (thought, answer)  # streamed == whole, no markup in the answer
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
        first_answer = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
        later = [c.choices[0].delta for c in chunks[first_answer + 1 :] if c.choices]
        assert not any(getattr(d, "reasoning_content", None) for d in later)  # the reasoning comes first

        body = (await stack.raw.post("/v1/chat/completions", json={"model": "thinker", "messages": ASK})).json()
        validate("CreateChatCompletionResponse", body)
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))


async def test_responses_have_a_reasoning_item_valid_against_openai_schema() -> None:
    thought, answer, reasoning_tokens = expected("qwen3")
    async with thinker() as stack:
        whole = await stack.client.responses.create(model="thinker", input="Is 1 < 2?", reasoning={"effort": "low"})
        reasoning_item, message = whole.output
        assert reasoning_item.type == "reasoning" and reasoning_item.summary == []
        assert [c.text for c in reasoning_item.content] == [thought] and whole.output_text == answer
        assert whole.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
        assert stack.rendered().template_kwargs == {"reasoning_effort": "low"}  # effort reaches the template
        ask = {"model": "thinker", "input": "Is 1 < 2?", "reasoning": {"effort": "low", "summary": "auto"}}
        body = (await stack.raw.post("/v1/responses", json=ask)).json()
        validate("Response", body)
        assert body["reasoning"] == {"effort": "low", "summary": "auto"}

        resp = await stack.raw.post("/v1/responses", json={"model": "thinker", "input": "Is 1 < 2?", "stream": True})
        events = events_of(resp.text)
        for event in events:
            validate("ResponseStreamEvent", event)
        kinds = [e["type"] for e in events]
        assert kinds[:6] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.delta",
        ]
        assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == thought
        assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == answer
        assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
        done = events[-1]["response"]
        assert done["status"] == "completed" and [i["type"] for i in done["output"]] == ["reasoning", "message"]

        # the stored response goes on: its reasoning reaches the template with the assistant message after it
        later = await stack.client.responses.create(model="thinker", input="And 3?", previous_response_id=whole.id)
        assistant = [m for m in stack.rendered().messages if m["role"] == "assistant"]
        assert assistant == [{"role": "assistant", "content": answer, "reasoning_content": thought}]
        items = (await stack.raw.get(f"/v1/responses/{later.id}/input_items", params={"order": "asc"})).json()
        validate("ResponseItemList", items)
        assert [i["type"] for i in items["data"]] == ["message", "reasoning", "message", "message"]


async def test_messages_have_a_thinking_block_valid_against_anthropic_schema() -> None:
    thought, answer, _ = expected("qwen3")
    ask = {"model": "thinker", "max_tokens": 200, "messages": ASK}
    async with thinker() as stack:
        claude = stack.claude()
        whole = await claude.messages.create(**ask)  # type: ignore[arg-type]
        blocks = [b.model_dump(exclude_none=True) for b in whole.content]
        assert blocks == [
            {"type": "thinking", "thinking": thought, "signature": ""},  # no signature: a local model has no key
            {"type": "text", "text": answer},  # the answer without the reasoning or its tags
        ]
        assert whole.stop_reason == "end_turn" and stack.rendered().template_kwargs == {}
        anthropic_schemas.validate("Message", (await stack.raw.post("/v1/messages", json=ask)).json())

        async with claude.messages.stream(**ask) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_message()
        assert [b.model_dump(exclude_none=True) for b in final.content] == blocks and final.usage == whole.usage

        resp = await stack.raw.post("/v1/messages", json={**ask, "stream": True})
        events = anthropic_events(resp.text)  # each one valid against its schema
        starts = [e["content_block"] for kind, e in events if kind == "content_block_start"]
        assert starts == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": ""}]
        deltas = [(e["index"], e["delta"]) for kind, e in events if kind == "content_block_delta"]
        assert "".join(d["thinking"] for i, d in deltas if d["type"] == "thinking_delta" and i == 0) == thought
        assert "".join(d["text"] for i, d in deltas if d["type"] == "text_delta" and i == 1) == answer
        assert {d["type"] for _, d in deltas} == {"thinking_delta", "text_delta"}  # no signature_delta: none to send
        kinds = [(kind, e.get("index")) for kind, e in events]
        assert kinds.index(("content_block_stop", 0)) < kinds.index(("content_block_start", 1))

        # the thinking of an earlier turn goes back to the template with its assistant message
        turns = [*ASK, {"role": "assistant", "content": blocks}]
        await claude.messages.create(**{**ask, "messages": [*turns, {"role": "user", "content": "And 3?"}]})  # type: ignore[arg-type]
        assistant = [m for m in stack.rendered().messages if m["role"] == "assistant"]
        assert assistant == [{"role": "assistant", "content": answer, "reasoning_content": thought}]


async def test_messages_thinking_disabled_reaches_the_template() -> None:
    """`thinking: {"type": "disabled"}` is `enable_thinking: false`: the template closes an empty block, the model
    answers at once, and the message has no thinking block."""
    async with thinker(script=f"<think>\n\n</think>\n\n{ANSWER.strip()}") as stack:
        out = await stack.claude().messages.create(
            model="thinker", max_tokens=200, messages=ASK, thinking={"type": "disabled"}
        )
        assert stack.rendered().template_kwargs == {"enable_thinking": False}
        assert [(b.type, getattr(b, "text", None)) for b in out.content] == [("text", ANSWER.strip())]


async def test_enable_thinking_false_and_reasoning_effort_reach_the_template() -> None:
    """With `enable_thinking: false` the template closes an empty block; the model answers at once."""
    async with thinker(script=f"<think>\n\n</think>\n\n{ANSWER.strip()}") as stack:
        out = await stack.client.chat.completions.create(
            model="thinker",
            messages=ASK,
            reasoning_effort="high",
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        assert stack.rendered().template_kwargs == {"reasoning_effort": "high", "enable_thinking": False}
        message = out.choices[0].message
        assert message.content == ANSWER.strip() and message.model_extra.keys().isdisjoint({"reasoning_content"})
        assert out.usage.completion_tokens_details is None

        refused = await stack.raw.post(
            "/v1/chat/completions",
            json={"model": "thinker", "messages": ASK, "chat_template_kwargs": {"add_generation_prompt": False}},
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"


async def test_a_json_schema_applies_after_the_reasoning() -> None:
    """The grammar lets the model reason freely (braces, a `</thinking` that is not the tag), then holds it to the
    schema; the scripted model writes prose after its reasoning, so every byte of JSON comes from the grammar."""
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    async with thinker() as stack:
        whole = await stack.client.chat.completions.create(model="thinker", messages=ASK, response_format=fmt)
        message = whole.choices[0].message
        assert message.reasoning_content == THOUGHT
        jsonschema.validate(json.loads(message.content), schema)
        streamed, content, _ = await chat_stream(stack.client, response_format=fmt)
        assert (streamed, content) == (THOUGHT, message.content)


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
async def test_tool_calls_are_parsed_only_after_the_reasoning(tool_choice: str) -> None:
    """A call the model mentions while it reasons is reasoning; a forced call's grammar starts after `</think>`."""
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    script = f"<think>\nI could write {call} now.\n</think>\n\n{call}"
    async with thinker(script=script) as stack:
        out = await stack.client.chat.completions.create(
            model="thinker", messages=ASK, tools=tools, tool_choice=tool_choice
        )
        choice = out.choices[0]
        assert choice.message.reasoning_content == f"\nI could write {call} now.\n"
        (tool_call,) = choice.message.tool_calls
        assert tool_call.function.name == "add" and json.loads(tool_call.function.arguments) == {"a": 1, "b": 2}
        assert choice.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "where",
    [
        lambda written: written.index("ü".encode()) + 1,  # inside the reasoning, half-way through a character
        lambda written: written.index(b"</think>") + 3,  # inside the closing tag
        lambda written: written.index(b"answer"),  # inside the answer
    ],
    ids=["reasoning", "closing-tag", "answer"],
)
@pytest.mark.parametrize("style", ["qwen3", "deepseek_r1"])
async def test_a_stream_cut_resumes_with_reasoning_and_answer_apart(style: str, where: Callable[[bytes], int]) -> None:
    """The cut comes after that many generated tokens (bytes): the other worker replays them and goes on."""
    written = SCRIPT.removeprefix("<think>\n" if style == "deepseek_r1" else "").encode()
    async with thinker(style) as stack:
        whole_thought, whole_answer, whole_chunks = await chat_stream(stack.client)
        stack.cut.after_tokens = where(written)
        thought, answer, chunks = await chat_stream(stack.client)
        assert stack.cut.victim is not None, "the stream was cut"
        assert (thought, answer) == (whole_thought, whole_answer) == expected(style)[:2]
        assert chunks[-1].usage == whole_chunks[-1].usage  # reasoning tokens counted once
        assert len({c.id for c in chunks}) == 1


async def test_completions_keep_the_raw_text() -> None:
    async with thinker() as stack:
        out = await stack.client.completions.create(model="thinker", prompt="assistant:", max_tokens=200)
        assert out.choices[0].text == SCRIPT and out.usage.model_extra.get("completion_tokens_details") is None
