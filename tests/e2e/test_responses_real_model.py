"""`/v1/responses` on the real model: SmolLM2-135M-Instruct (GGUF, llama.cpp) behind real controller, worker and
API processes, asked with the official `openai` client (`responses.create`, `responses.stream`) and by an OpenAI
Agents SDK agent; stored responses kept in a SQLite file across a restart of the API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import validate
from tests.conftest import Fleet

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

SYSTEM = "You are a helpful assistant."
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("responses-db") / "responses.sqlite3"


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("responses")) as f:
        f.controller()
        f.worker("worker", smollm2_gguf, "--model-names", "smollm2", "--threads", "1", "--max-model-len", "2048")
        f.api("--responses-db", str(db))
        f.wait_models(1)
        yield f


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)


def ask(client: openai.OpenAI, **kw):
    kw.setdefault("model", "smollm2")
    kw.setdefault("instructions", SYSTEM)
    kw.setdefault("input", FRANCE)
    kw.setdefault("max_output_tokens", 32)
    return client.responses.create(temperature=0, **kw)


def test_it_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = ask(client)
    assert "Paris" in reply.output_text and reply.status == "completed"
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 32


def test_streamed_text_equals_the_whole_answer(client: openai.OpenAI) -> None:
    whole = ask(client, max_output_tokens=48)
    with client.responses.stream(
        model="smollm2", instructions=SYSTEM, input=FRANCE, max_output_tokens=48, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text and len(deltas) > 3


def test_real_bodies_and_events_validate_against_openais_schemas(fleet: Fleet) -> None:
    body = {"model": "smollm2", "instructions": SYSTEM, "input": FRANCE, "max_output_tokens": 4, "temperature": 0}
    resp = httpx.post(fleet.api_url + "/v1/responses", json=body, timeout=60)
    validate("Response", resp.json())
    assert resp.json()["status"] == "incomplete"  # 4 tokens cut the answer
    with httpx.stream("POST", fleet.api_url + "/v1/responses", json={**body, "stream": True}, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    for event in events:
        validate("ResponseStreamEvent", event)
    assert events[-1]["type"] == "response.incomplete" and len(events) >= 10


def test_previous_response_id_sends_the_conversation_again(client: openai.OpenAI) -> None:
    first = ask(client)
    italy = {"input": "And what is the capital of Italy?", "instructions": None}
    alone, second = ask(client, **italy), ask(client, **italy, previous_response_id=first.id)
    # the earlier question and answer were part of the second prompt
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id and second.output_text
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [i.type for i in items] == ["message"] * 3 and items[1].id == first.output[0].id


async def test_an_openai_agents_sdk_agent_answers(fleet: Fleet) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner

    client = openai.AsyncOpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)
    agent = Agent(
        name="assistant",
        instructions=SYSTEM,
        model=OpenAIResponsesModel(model="smollm2", openai_client=client),
        model_settings=ModelSettings(temperature=0, max_tokens=32),
    )
    result = await Runner.run(agent, FRANCE, run_config=RunConfig(tracing_disabled=True))
    assert "Paris" in result.final_output
    await client.close()


def test_stored_responses_outlive_a_restart_of_the_api_server(fleet: Fleet, db: Path, client: openai.OpenAI) -> None:
    kept = ask(client)
    fleet.procs["api"].stop()
    fleet.api("--responses-db", str(db))
    fleet.wait_models(1)
    again = client.responses.retrieve(kept.id)
    assert again.output_text == kept.output_text and again.status == kept.status
    follow = ask(client, input="Thank you.", previous_response_id=kept.id, max_output_tokens=8)
    assert follow.previous_response_id == kept.id


def chat_path_has_tools() -> bool:
    from lmfleet.protocol.openai import ChatCompletionRequest

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [tool]})
    except ValueError:
        return False
    return True


@pytest.mark.skipif(not chat_path_has_tools(), reason="the chat path has no tools yet (branch structured)")
async def test_an_agents_sdk_agent_calls_a_function_tool(fleet: Fleet) -> None:
    """A forced call (tool_choice required: the worker's grammar makes the model call it), run by the SDK, whose
    output is the agent's answer; then a second run sends the call and its output back as input items."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny in {city}."

    client = openai.AsyncOpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)
    model = OpenAIResponsesModel(model="smollm2", openai_client=client)
    agent = Agent(
        name="weather",
        instructions=SYSTEM,
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(temperature=0, max_tokens=64, tool_choice="required", parallel_tool_calls=False),
        tool_use_behavior="stop_on_first_tool",
    )
    result = await Runner.run(agent, "What is the weather in Paris?", run_config=RunConfig(tracing_disabled=True))
    assert len(calls) == 1 and result.final_output == f"Sunny in {calls[0]}."
    # the conversation so far (function_call and function_call_output items included) goes back for an answer
    answer = Agent(
        name="answer", instructions=SYSTEM, model=model, model_settings=ModelSettings(temperature=0, max_tokens=32)
    )
    follow = await Runner.run(answer, result.to_input_list(), run_config=RunConfig(tracing_disabled=True))
    assert follow.final_output
    await client.close()
