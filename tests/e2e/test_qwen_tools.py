"""Tool calling on a real tool-calling model: Qwen2.5-Coder-0.5B-Instruct (GGUF, llama.cpp, its own Hermes-style
chat template, `<tool_call>` one token of its vocabulary) behind real controller, worker and API processes, asked
with the official `openai` client, LangChain and an OpenAI Agents SDK agent. SmolLM2-135M-Instruct beside it (the
generic tool prompt) for forced arguments that must stop at the schema's properties.

What must hold whatever the model chooses: forced calls (`tool_choice` "required" or a named function) are always
valid calls whose arguments validate against the function's schema read strictly; a reply that is only a call is a
call, streamed as tool-call deltas that join to the whole call; a text answer stays text; nothing answers 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from lmfleet.engine.grammar import closed
from tests.conftest import Fleet

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

QWEN, SMOL = "qwen", "smollm2"
SYSTEM = "You are a helpful assistant. Use the tools' results in your answers."
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def fleet(qwen05_gguf: Path, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("qwen-tools")) as f:
        f.controller()
        # one thread each: llama.cpp's threads wait on each other, which costs most on a busy machine
        f.worker("qwen", qwen05_gguf, "--model-names", QWEN, "--max-model-len", "2048", "--threads", "1")
        f.worker("smollm2", smollm2_gguf, "--model-names", SMOL, "--max-model-len", "2048", "--threads", "1")
        f.api()
        f.wait_models(2)
        yield f


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0, timeout=300) as c:
        yield c


def ask(client: openai.OpenAI, question: str, **kw: Any) -> Any:
    """A chat completion at temperature 0; with `stream`, the chunks."""
    kw.setdefault("model", QWEN)
    kw.setdefault("max_tokens", 60)
    if kw.setdefault("tools", [WEATHER]) is None:
        del kw["tools"]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(messages=kw.pop("messages", messages), temperature=0, **kw)


def valid_call(call: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The call's arguments, once its name is an offered function's and its arguments are complete JSON valid
    against that function's schema read strictly (no undeclared property)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id and call.function.name in schemas, call
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, closed(schemas[call.function.name]))
    return arguments


def joined(chunks: list[Any]) -> tuple[str, list[tuple[str, str]], str | None]:
    """A stream's content, its calls (name, arguments) joined from the deltas by index, and its finish reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                name, arguments = calls.get(piece.index, ("", ""))
                calls[piece.index] = (
                    name + (piece.function.name or ""),
                    arguments + (piece.function.arguments or ""),
                )
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


# What the tools run. A JSON result: the 0.5B answers with it, where it takes a sentence for a cue to call again.
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return json.dumps({"city": city, "temperature_celsius": 23, "sky": "sunny"})


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_a_forced_call_is_a_valid_call_whole_and_streamed(client: openai.OpenAI, choice: Any) -> None:
    """Qwen writes `<tool_call>` as one token; the forced-call grammar must take it (this was a 502: the grammar's
    vocabulary called that token special while llama.cpp's tokenizer makes it from the text)."""
    question = "What is the weather in Paris?"
    whole = ask(client, question, tool_choice=choice, parallel_tool_calls=False)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and not message.content
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and valid_call(call, [WEATHER])["city"] == "Paris"
    content, calls, finish = joined(
        list(ask(client, question, tool_choice=choice, parallel_tool_calls=False, stream=True))
    )
    assert (content, calls, finish) == ("", [(call.function.name, call.function.arguments)], "tool_calls")


def test_auto_a_reply_that_is_a_bare_call_is_the_call_whole_and_streamed(client: openai.OpenAI) -> None:
    """With tool_choice auto the 0.5B answers `{"name": "get_weather", "arguments": {...}}` without the tags."""
    whole = ask(client, "What is the weather in Paris?")
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and not message.content, message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and valid_call(call, [WEATHER])["city"] == "Paris"
    chunks = list(ask(client, "What is the weather in Paris?", stream=True))
    assert joined(chunks) == ("", [(call.function.name, call.function.arguments)], "tool_calls")
    assert not any(c.delta.content for chunk in chunks for c in chunk.choices), "a call is never sent as content"


def test_auto_a_call_in_a_markdown_fence_is_the_call(client: openai.OpenAI) -> None:
    """With two tools and no system prompt the 0.5B puts its call in a ```json fence."""
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    whole = ask(client, "", messages=messages, tools=[WEATHER, TIME])
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and not message.content, message
    assert [valid_call(c, [WEATHER, TIME])["city"] for c in message.tool_calls] == ["Tokyo"]
    streamed = joined(list(ask(client, "", messages=messages, tools=[WEATHER, TIME], stream=True)))
    assert streamed == ("", [(c.function.name, c.function.arguments) for c in message.tool_calls], "tool_calls")


def test_auto_a_text_answer_stays_text(client: openai.OpenAI) -> None:
    """Small talk is text; so is JSON that is not a call to an offered function (the model names its cat "Cat" or
    "cat", bare or fenced: which one, a near tie, may differ between two runs of the same prompt on llama.cpp)."""
    for question in ("Hello! How are you?", "Write a JSON object describing a cat."):
        reply = ask(client, question, max_tokens=16)
        message = reply.choices[0].message
        assert not message.tool_calls and message.content and reply.choices[0].finish_reason in ("stop", "length")
        content, calls, finish = joined(list(ask(client, question, max_tokens=16, stream=True)))
        assert content and calls == [] and finish in ("stop", "length")


def test_parallel_calls_are_each_valid(client: openai.OpenAI) -> None:
    """`parallel_tool_calls` (the default) lets a forced answer hold several calls: whichever the model makes, each
    is valid, and streamed they join to the same calls; without it there is exactly one."""
    question = "What time is it in Tokyo, and what is the weather there?"
    tools = [WEATHER, TIME]
    whole = ask(client, question, tools=tools, tool_choice="required", max_tokens=120)
    calls = whole.choices[0].message.tool_calls
    assert calls and whole.choices[0].finish_reason == "tool_calls"
    for call in calls:
        valid_call(call, tools)
    assert len({c.id for c in calls}) == len(calls)
    streamed = joined(list(ask(client, question, tools=tools, tool_choice="required", max_tokens=120, stream=True)))
    assert streamed == ("", [(c.function.name, c.function.arguments) for c in calls], "tool_calls")
    one = ask(client, question, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    assert len(one.choices[0].message.tool_calls) == 1
    valid_call(one.choices[0].message.tool_calls[0], tools)


def test_a_round_trip_answers_with_the_tools_result(client: openai.OpenAI) -> None:
    """The assistant's call and the tool's result go back (the template writes them as `<tool_call>` and
    `<tool_response>`); the model answers with the result, in text (the 0.5B writes its call again, then the
    result: not a reply that is only a call)."""
    question = "What is the weather in Paris?"
    call = ask(client, question, tool_choice="required", parallel_tool_calls=False).choices[0].message.tool_calls[0]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": get_weather(valid_call(call, [WEATHER])["city"])},
    ]
    reply = ask(client, question, messages=messages)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop" and not message.tool_calls
    assert "23" in message.content, message.content


def test_a_langchain_bind_tools_loop_runs_the_function_and_uses_its_answer(fleet: Fleet) -> None:
    """`bind_tools` with tool_choice auto: the model's (bare) call is parsed into `tool_calls`, the Python
    function runs, its result goes back as a `ToolMessage`, and the model answers with it."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool

    weather = tool(get_weather)
    llm = langchain_openai.ChatOpenAI(
        base_url=fleet.api_url + "/v1", api_key="none", model=QWEN, temperature=0, max_tokens=80, max_retries=0
    ).bind_tools([weather])
    messages: list[Any] = [SystemMessage(SYSTEM), HumanMessage("What is the weather in Paris?")]
    for _ in range(3):  # the loop an agent runs: call tools until the model answers
        reply = llm.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            assert call["name"] == "get_weather"
            jsonschema.validate(call["args"], closed(weather.args_schema.model_json_schema()))
            messages.append(ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"]))
    calls = [m for m in messages if isinstance(m, ToolMessage)]
    assert calls and "Paris" in calls[0].content
    assert not messages[-1].tool_calls and "23" in messages[-1].content, messages[-1].content


async def test_an_agents_sdk_agent_calls_a_function_and_answers_with_it(fleet: Fleet) -> None:
    """An OpenAI Agents SDK agent over /v1/responses, tool_choice auto: it calls the Python function (the model's
    bare call parsed) and answers with what the function returned."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

    cities: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return get_weather(city)

    client = openai.AsyncOpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)
    agent = Agent(
        name="assistant",
        instructions=SYSTEM,
        model=OpenAIResponsesModel(model=QWEN, openai_client=client),
        tools=[weather],
        model_settings=ModelSettings(temperature=0, max_tokens=80),
    )
    result = await Runner.run(
        agent, "What is the weather in Paris?", max_turns=3, run_config=RunConfig(tracing_disabled=True)
    )
    await client.close()
    assert cities and cities[0] == "Paris"
    assert "23" in result.final_output, result.final_output


def test_forced_arguments_stop_at_the_declared_properties(client: openai.OpenAI) -> None:
    """SmolLM2 used to add an undeclared property after the declared one and run on until max_tokens (truncated
    JSON), or fill an object with properties of its own: forced arguments and strict schemas take no property the
    schema does not declare."""
    pydantic_style = {  # as LangChain's @tool writes a function's schema
        "description": "Get the current weather in a city.",
        "properties": {"city": {"title": "City", "type": "string"}},
        "required": ["city"],
        "title": "get_weather",
        "type": "object",
    }
    nothing_required = {"type": "object", "properties": {"city": {"type": "string"}}}
    for parameters, question, choice in (
        (pydantic_style, "How hot is it in Madrid, in fahrenheit?", "required"),
        (nothing_required, "Is it raining in Berlin?", {"type": "function", "function": {"name": "get_weather"}}),
    ):
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": question},
        ]
        reply = ask(
            client, "", messages=messages, model=SMOL, tools=[tool], tool_choice=choice, parallel_tool_calls=False
        )
        assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
        (call,) = reply.choices[0].message.tool_calls
        assert set(valid_call(call, [tool])) <= {"city"}
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}}}
    strict = ask(
        client,
        "What is the capital of France? Answer with the city and its country.",
        model=SMOL,
        tools=None,
        max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
    )
    assert strict.choices[0].finish_reason == "stop"
    answer = json.loads(strict.choices[0].message.content)
    jsonschema.validate(answer, closed(schema))
