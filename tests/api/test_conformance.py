"""What the API server sends validates against OpenAI's published schemas (tests/conformance), on the wire as
plain HTTP reads it: bodies, every stream chunk, model cards and errors."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.conformance import anthropic as anthropic_schemas
from tests.conformance import validate

from .fakes import Fleet, serve, sse_events

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]


def _typed(text: str) -> list[dict[str, Any]]:
    """The events of a typed SSE body (`event: <type>` then `data: {json}`), as Responses and Messages send them."""
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]


def _chunks(text: str) -> list[dict[str, Any]]:
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_chat_completion_body() -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/chat/completions", json={"model": "echo", "messages": MESSAGES, "n": 2})
        body = resp.json()
        validate("CreateChatCompletionResponse", body)
        assert [c["message"]["refusal"] for c in body["choices"]] == [None, None]


async def test_chat_stream_chunks() -> None:
    request = {"model": "echo", "messages": MESSAGES, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    async with serve() as api:
        chunks = _chunks((await api.raw.post("/v1/chat/completions", json=request)).text)
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk)
        # `role` comes once per choice, in its first delta, and is absent (not null) afterwards.
        for index in (0, 1):
            deltas = [ch["delta"] for c in chunks for ch in c["choices"] if ch["index"] == index]
            assert len(deltas) > 1 and deltas[0]["role"] == "assistant"
            assert all("role" not in d for d in deltas[1:]), deltas
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


async def test_completion_body_and_stream() -> None:
    async with serve() as api:
        body = (await api.raw.post("/v1/completions", json={"model": "echo", "prompt": "a b c"})).json()
        validate("CreateCompletionResponse", body)
        stream = await api.raw.post("/v1/completions", json={"model": "echo", "prompt": "a b c", "stream": True})
        chunks = _chunks(stream.text)
        assert chunks and chunks[-1]["choices"][0]["finish_reason"] == "stop"
        # The document has no stream schema for completions: chunks share the response's shape, except that
        # OpenAI (like every server its clients talk to) sends `finish_reason: null` until a choice ends.
        for chunk in chunks:
            for choice in chunk["choices"]:
                choice["finish_reason"] = choice["finish_reason"] or "stop"
            validate("CreateCompletionResponse", chunk)


async def test_models() -> None:
    async with serve(Fleet({"echo": ["a"], "other": ["b"]})) as api:
        validate("ListModelsResponse", (await api.raw.get("/v1/models")).json())
        validate("Model", (await api.raw.get("/v1/models/other")).json())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "missing", "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "echo", "messages": MESSAGES, "temperature": 9}),
        ("/v1/completions", {"model": "echo"}),
    ],
)
async def test_errors(path: str, body: dict[str, Any]) -> None:
    async with serve() as api:
        resp = await api.raw.post(path, json=body)
        assert resp.status_code in (400, 404)
        validate("ErrorResponse", resp.json())


def test_the_validator_rejects_what_openai_does_not_send() -> None:
    """The check has teeth: the two gaps the published document shows in older output fail it."""
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    with pytest.raises(jsonschema.ValidationError):
        validate(
            "CreateChatCompletionStreamResponse",
            {**chunk, "choices": [{"index": 0, "delta": {"role": None, "content": "a"}, "finish_reason": None}]},
        )
    message = {"role": "assistant", "content": "a"}  # no `refusal`
    completion = {"id": "x", "object": "chat.completion", "created": 1, "model": "m"}
    with pytest.raises(jsonschema.ValidationError):
        validate(
            "CreateChatCompletionResponse",
            {**completion, "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}]},
        )


async def test_cached_tokens_in_every_usage_shape_validate() -> None:
    """The prompt tokens the worker served from its prefix cache, in each endpoint's usage, whole and streamed, as
    OpenAI's (and Anthropic's) schemas spell them; a prompt shared by n choices counts them once."""
    fleet = Fleet()
    fleet.all_workers(cached_tokens=3)
    usage_stream = {"stream": True, "stream_options": {"include_usage": True}}
    async with serve(fleet) as api:
        chat = {"model": "echo", "messages": MESSAGES, "n": 2}
        body = (await api.raw.post("/v1/chat/completions", json=chat)).json()
        validate("CreateChatCompletionResponse", body)
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
        chat_prompt = body["usage"]["prompt_tokens"]
        chunks = _chunks((await api.raw.post("/v1/chat/completions", json={**chat, **usage_stream})).text)
        validate("CreateChatCompletionStreamResponse", chunks[-1])
        assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}

        completion = {"model": "echo", "prompt": "a b c d"}
        body = (await api.raw.post("/v1/completions", json=completion)).json()
        validate("CreateCompletionResponse", body)
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
        chunks = _chunks((await api.raw.post("/v1/completions", json={**completion, **usage_stream})).text)
        assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
        validate("CompletionUsage", chunks[-1]["usage"])

        response = {"model": "echo", "input": "What is deep learning?"}
        body = (await api.raw.post("/v1/responses", json=response)).json()
        validate("Response", body)
        assert body["usage"]["input_tokens_details"]["cached_tokens"] == 3
        events = _typed((await api.raw.post("/v1/responses", json={**response, "stream": True})).text)
        completed = [e for e in events if e["type"] == "response.completed"]
        assert len(completed) == 1 and completed[0]["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 3
        validate("ResponseStreamEvent", completed[0])

        message = {"model": "echo", "max_tokens": 50, "messages": MESSAGES}
        body = (await api.raw.post("/v1/messages", json=message, headers={"x-api-key": "sk-test"})).json()
        anthropic_schemas.validate("Message", body)
        prompt = body["usage"]["input_tokens"] + body["usage"]["cache_read_input_tokens"]
        assert body["usage"]["cache_read_input_tokens"] == 3 and prompt == chat_prompt  # Anthropic's sum: the prompt
        stream = await api.raw.post("/v1/messages", json={**message, "stream": True}, headers={"x-api-key": "sk-test"})
        deltas = _typed(stream.text)
        (last,) = [e for e in deltas if e["type"] == "message_delta"]
        anthropic_schemas.validate("RawMessageDeltaEvent", last)
        assert last["usage"]["cache_read_input_tokens"] == 3
