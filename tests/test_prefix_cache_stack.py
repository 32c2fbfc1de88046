"""The prefix cache's figure from engine to client: the real API app over a real worker app over a scripted engine
with a prefix cache (and the real controller), asked through the official OpenAI client. Every usage that carries
cached tokens says 0 for a prompt nothing was cached for, and the cached count once the same prompt comes again:
chat and completions (whole, and the stream's usage chunk), Responses (whole, and `response.completed`) and
Anthropic's Messages (`cache_read_input_tokens`, the rest in `input_tokens`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import openai
import pytest
from fastapi import FastAPI

from lmfleet.worker.app import create_app as create_worker
from tests.fakes import ScriptedEngine, loaded
from tests.test_stack import open_stack, worker_settings

pytestmark = pytest.mark.timeout(60)

MODEL = "story"


@pytest.fixture
async def stack() -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient]]:
    def worker(name: str, http: httpx.AsyncClient) -> FastAPI:
        engine = ScriptedEngine("Once upon a time.", max_model_len=512, prefix_cache=True)
        return create_worker(
            worker_settings(name, model_path=f"/models/{MODEL}.gguf"), load=lambda _s: loaded(engine), http_client=http
        )

    async with contextlib.AsyncExitStack() as exits:
        client, raw, _ = await open_stack(exits, worker, workers=("http://worker-a",))
        yield client, raw


# Each asks one way and returns (prompt tokens, cached tokens) from the usage the client read.
Ask = Callable[[openai.AsyncOpenAI, httpx.AsyncClient, str], Awaitable[tuple[int, int]]]


async def chat(client: openai.AsyncOpenAI, _raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    out = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4)
    assert out.usage and out.usage.prompt_tokens_details
    return out.usage.prompt_tokens, out.usage.prompt_tokens_details.cached_tokens or 0


async def chat_stream(client: openai.AsyncOpenAI, _raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage async for c in stream][-1]
    assert usage and usage.prompt_tokens_details
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


async def completion(client: openai.AsyncOpenAI, _raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    out = await client.completions.create(model=MODEL, prompt=text, max_tokens=4)
    assert out.usage and out.usage.prompt_tokens_details
    return out.usage.prompt_tokens, out.usage.prompt_tokens_details.cached_tokens or 0


async def completion_stream(client: openai.AsyncOpenAI, _raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    stream = await client.completions.create(
        model=MODEL, prompt=text, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage async for c in stream][-1]
    assert usage and usage.prompt_tokens_details
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


async def response(client: openai.AsyncOpenAI, _raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    out = await client.responses.create(model=MODEL, input=text, max_output_tokens=64)
    assert out.usage
    return out.usage.input_tokens, out.usage.input_tokens_details.cached_tokens


async def response_stream(client: openai.AsyncOpenAI, _raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    stream = await client.responses.create(model=MODEL, input=text, max_output_tokens=64, stream=True)
    (done,) = [e async for e in stream if e.type == "response.completed"]
    assert done.response.usage
    return done.response.usage.input_tokens, done.response.usage.input_tokens_details.cached_tokens


async def message(_client: openai.AsyncOpenAI, raw: httpx.AsyncClient, text: str) -> tuple[int, int]:
    body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    usage = (await raw.post("/v1/messages", json=body)).json()["usage"]
    return usage["input_tokens"] + usage["cache_read_input_tokens"], usage["cache_read_input_tokens"]


@pytest.mark.parametrize(
    "ask",
    [chat, chat_stream, completion, completion_stream, response, response_stream, message],
    ids=lambda f: f.__name__,
)
async def test_cached_tokens_are_0_then_the_cached_prefix(stack, ask: Ask) -> None:
    client, raw = stack
    prompt, cached = await ask(client, raw, "What is a prefix cache?")
    assert prompt > 0 and cached == 0  # nothing was cached for it
    again, cached = await ask(client, raw, "What is a prefix cache?")
    assert again == prompt and cached == prompt - 1  # all but the last token, which an engine always computes
    other, cached = await ask(client, raw, "Why?")
    assert 0 < cached < other  # the chat template's (or nothing's) shared start, no more
