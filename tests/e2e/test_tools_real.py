"""Structured outputs and an agent loop with the real model (SmolLM2-135M-Instruct GGUF on llama.cpp) through real
controller, worker and API processes, as LangChain and the official client use them. SmolLM2's chat template takes
no tools, so the worker writes the generic (Hermes) tool prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pydantic
import pytest

from tests.conformance import validate
from tests.conftest import Fleet

pytest.importorskip("llama_cpp")
langchain_openai = pytest.importorskip("langchain_openai")
pytestmark = pytest.mark.timeout(300)

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("tools")) as f:
        f.controller()
        f.worker("worker", smollm2_gguf, "--model-names", "smollm2", "--max-model-len", "2048")
        f.api()
        f.wait_models(1)
        yield f


@pytest.fixture
def llm(fleet: Fleet):
    return langchain_openai.ChatOpenAI(
        base_url=fleet.api_url + "/v1", api_key="none", model="smollm2", temperature=0, max_tokens=200, max_retries=0
    )


class Capital(pydantic.BaseModel):
    city: str
    country: str


def test_langchain_structured_output_and_the_official_parse(fleet: Fleet, llm) -> None:
    question = [SystemMessage(SYSTEM), HumanMessage("What is the capital of France? Give the city and its country.")]
    answer = llm.with_structured_output(Capital).invoke(question)
    assert isinstance(answer, Capital) and answer.city == "Paris"
    client = openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.parse(
        model="smollm2",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the capital of Italy? Give the city and its country."},
        ],
        response_format=Capital,
        temperature=0,
        max_tokens=100,
    )
    assert isinstance(reply.choices[0].message.parsed, Capital)
    assert reply.choices[0].message.parsed.country.lower() == "italy"
    body = httpx.post(
        fleet.api_url + "/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Name a fruit."}],
            "response_format": {"type": "json_object"},
            "max_tokens": 100,
            "temperature": 0,
        },
        timeout=120,
    ).json()
    validate("CreateChatCompletionResponse", body)
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 degrees in {city}."


def test_an_agent_loop_calls_a_tool_and_answers_with_its_result(llm) -> None:
    """LangChain's `bind_tools`: the model is made to call the tool (tool_choice names it), the tool runs, its result
    goes back as a `tool` message, and the model answers in text."""
    messages = [SystemMessage(SYSTEM), HumanMessage("What is the weather in Paris?")]
    call = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert [c["name"] for c in call.tool_calls] == ["get_weather"]
    assert call.tool_calls[0]["args"]["city"] == "Paris"
    result = get_weather.invoke(call.tool_calls[0]["args"])
    messages += [call, ToolMessage(result, tool_call_id=call.tool_calls[0]["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert not final.tool_calls and "21" in final.content, final.content


def test_a_streamed_tool_call_validates_and_matches_the_whole_one(fleet: Fleet) -> None:
    request = {
        "model": "smollm2",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather in Tokyo?"}],
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": get_weather.args_schema.model_json_schema()},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 100,
    }
    body = httpx.post(fleet.api_url + "/v1/chat/completions", json=request, timeout=120).json()
    validate("CreateChatCompletionResponse", body)
    (whole,) = body["choices"][0]["message"]["tool_calls"]
    assert whole["function"]["name"] == "get_weather" and json.loads(whole["function"]["arguments"])["city"]
    with httpx.stream(
        "POST", fleet.api_url + "/v1/chat/completions", json={**request, "stream": True}, timeout=120
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    pieces = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls") or []]
    assert pieces[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"]["arguments"] for p in pieces) == whole["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
