"""`/v1/messages` on the real model: SmolLM2-135M-Instruct (GGUF, llama.cpp) behind real controller, worker and API
processes, asked with the official `anthropic` client as Claude Code asks (its key as `x-api-key`): an answer, the
same answer streamed, a stop sequence, a forced tool call, and count_tokens against a generation's own count."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.conformance.anthropic import EVENTS, validate
from tests.conftest import Fleet

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

KEY = "sk-local"
SYSTEM = "You are a helpful assistant."
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}  # not in the SDK's signature any more; the API still takes it
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("messages")) as f:
        f.controller()
        f.worker("worker", smollm2_gguf, "--model-names", "smollm2", "--threads", "1", "--max-model-len", "2048")
        f.api("--api-keys", KEY)
        f.wait_models(1, headers={"x-api-key": KEY})
        yield f


def prompt_tokens(usage: anthropic.types.Usage) -> int:
    """The whole prompt: Anthropic's `input_tokens` leaves out what was read from the cache."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


@pytest.fixture
def client(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=None, base_url=fleet.api_url, default_headers={"x-api-key": KEY}, max_retries=0)


def test_it_knows_the_capital_of_france_streamed_or_not(client: anthropic.Anthropic, fleet: Fleet) -> None:
    whole = client.messages.create(model="smollm2", max_tokens=48, system=SYSTEM, messages=FRANCE, extra_body=GREEDY)
    assert "Paris" in whole.content[0].text and whole.stop_reason in ("end_turn", "max_tokens")
    assert whole.usage.input_tokens > 10 and 0 < whole.usage.output_tokens <= 48
    with client.messages.stream(
        model="smollm2", max_tokens=48, system=SYSTEM, messages=FRANCE, extra_body=GREEDY
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == final.content[0].text == whole.content[0].text and len(texts) > 3
    # the second asking finds the first one's prompt in the prefix cache: Anthropic counts those tokens apart
    assert prompt_tokens(final.usage) == prompt_tokens(whole.usage) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens and (final.usage.cache_read_input_tokens or 0) > 0
    body = {"model": "smollm2", "max_tokens": 4, "system": SYSTEM, "messages": FRANCE, **GREEDY}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    validate("Message", httpx.post(fleet.api_url + "/v1/messages", json=body, headers=headers, timeout=60).json())
    with httpx.stream(
        "POST", fleet.api_url + "/v1/messages", json={**body, "stream": True}, headers=headers, timeout=60
    ) as resp:
        lines = [line for line in resp.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    for event in events:
        validate(EVENTS[event["type"]], event)
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"  # 4 tokens cut the answer


def test_a_stop_sequence_ends_the_answer_and_is_named(client: anthropic.Anthropic) -> None:
    out = client.messages.create(
        model="smollm2", max_tokens=48, system=SYSTEM, messages=FRANCE, stop_sequences=["Paris"], extra_body=GREEDY
    )
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == "Paris"
    assert "Paris" not in out.content[0].text and "capital" in out.content[0].text


def test_a_forced_tool_call_and_count_tokens(client: anthropic.Anthropic) -> None:
    ask = {"model": "smollm2", "system": SYSTEM, "tools": [WEATHER]}
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.messages.create(**ask, max_tokens=64, messages=weather, tool_choice={"type": "any"}, extra_body=GREEDY)  # type: ignore[arg-type]
    calls = [b for b in out.content if b.type == "tool_use"]
    assert out.stop_reason == "tool_use" and calls and calls[0].name == "get_weather"
    assert isinstance(calls[0].input, dict) and isinstance(calls[0].input.get("city"), str)
    counted = client.messages.count_tokens(**ask, messages=weather)  # type: ignore[arg-type]
    assert counted.input_tokens == prompt_tokens(out.usage)  # the same prompt, tools included
    without = client.messages.count_tokens(model="smollm2", system=SYSTEM, messages=weather)
    assert without.input_tokens < counted.input_tokens
