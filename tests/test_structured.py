"""Structured outputs and tool calls through the whole stack in one process: the real API app, the real controller
app and two real worker apps serving the tiny random LLaMA on the transformers engine (it emits noise on its own, so
whatever is well-formed comes from the grammar), driven by the official `openai` client. Responses and chunks
validate against OpenAI's published schemas; a stream cut inside a tool call resumes on the other worker with the
grammar state rebuilt from the ids already sent."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator

import httpx
import jsonschema
import openai
import pydantic
import pytest
from fastapi import FastAPI

from lmfleet.worker.app import create_app as create_worker
from tests.conformance import validate
from tests.test_stack import Cut, open_stack, worker_settings

pytest.importorskip("torch")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.timeout(300)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "floor": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["city", "floor"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "scores", "home"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 999},
                "b": {"type": "integer", "minimum": 0, "maximum": 999},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Tell me about someone."}]


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory) -> str:
    """The tiny model with room for the generic tool prompt (its 1024-token vocabulary spells JSON long)."""
    folder = tmp_path_factory.mktemp("long") / "tiny"
    shutil.copytree(tiny_models["alpha"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return str(folder)


@pytest.fixture
async def fleet(model_dir) -> AsyncIterator[tuple[openai.AsyncOpenAI, httpx.AsyncClient, Cut]]:
    def worker(name: str, http: httpx.AsyncClient) -> FastAPI:
        settings = worker_settings(name, model_path=model_dir, model_names=["tiny"], engine="transformers")
        return create_worker(settings, http_client=http)

    async with contextlib.AsyncExitStack() as exits:
        yield await open_stack(exits, worker)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


async def test_every_choice_of_every_seed_validates(fleet) -> None:
    client, raw, _ = fleet
    seen = set()
    for seed in range(6):
        resp = await raw.post(
            "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": ASK,
                "n": 3,
                "seed": seed,
                "max_tokens": 200,
                "response_format": schema_format(PERSON),
            },
        )
        body = resp.json()
        validate("CreateChatCompletionResponse", body)
        for choice in body["choices"]:
            assert choice["finish_reason"] == "stop"
            value = json.loads(choice["message"]["content"])
            jsonschema.validate(value, PERSON)
            seen.add(json.dumps(value))
    assert len(seen) >= 6, "sampling is still sampling, inside the grammar (choice j of seed s uses seed s + j)"


async def test_json_mode_gives_a_json_object(fleet) -> None:
    client, _, _ = fleet
    reply = await client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=150, temperature=0, response_format={"type": "json_object"}
    )
    if reply.choices[0].finish_reason == "stop":  # noise may nest objects past max_tokens; a finished one is valid
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert reply.choices[0].message.content.startswith("{")


class Home(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    floor: int = pydantic.Field(ge=0, le=9)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=18, le=99)
    admin: bool
    home: Home


async def test_the_official_client_parses_into_a_pydantic_model(fleet) -> None:
    client, _, _ = fleet
    for seed in range(3):
        reply = await client.chat.completions.parse(
            model="tiny", messages=ASK, response_format=Person, max_tokens=200, seed=seed
        )
        person = reply.choices[0].message.parsed
        assert isinstance(person, Person) and 18 <= person.age <= 99


async def test_a_schema_that_cannot_be_enforced_is_a_400_naming_response_format(fleet) -> None:
    _, raw, _ = fleet
    bad = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}
    resp = await raw.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": ASK, "response_format": schema_format(bad)}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "response_format" and "nowhere" in resp.json()["error"]["message"]
    bad_tool = {**ADD, "function": {**ADD["function"], "parameters": bad}}
    resp = await raw.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": ASK, "tools": [bad_tool], "tool_choice": "required"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools"


def check_call(call, tools: list[dict]) -> dict:
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, spec["parameters"])
    assert call.type == "function" and call.id.startswith("call_")
    return args


async def test_a_named_function_is_called_with_arguments_that_validate(fleet) -> None:
    client, raw, _ = fleet
    for seed in range(4):
        reply = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "add"}},
            seed=seed,
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [c.function.name for c in choice.message.tool_calls] == ["add"]
        check_call(choice.message.tool_calls[0], [WEATHER, ADD])
    body = (
        await raw.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": ASK, "tools": [WEATHER], "tool_choice": "required"},
        )
    ).json()
    validate("CreateChatCompletionResponse", body)
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_required_may_call_several_tools_and_streams_as_openai_deltas(fleet) -> None:
    client, raw, _ = fleet
    request = {
        "model": "tiny",
        "messages": ASK,
        "tools": [WEATHER, ADD],
        "tool_choice": "required",
        "seed": 3,
        "max_tokens": 300,
    }
    whole = (await client.chat.completions.create(**request)).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    for call in whole.message.tool_calls:
        check_call(call, [WEATHER, ADD])
    resp = await raw.post("/v1/chat/completions", json={**request, "stream": True})
    chunks = [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("content") for d in deltas), "no raw text of a call in content"
    pieces = [p for d in deltas for p in d.get("tool_calls") or []]
    calls: dict[int, dict] = {}
    for p in pieces:
        if p["index"] not in calls:  # the first piece of a call has its id, type and name
            assert p["id"].startswith("call_") and p["type"] == "function" and p["function"]["name"]
            calls[p["index"]] = {"name": p["function"]["name"], "arguments": ""}
        else:
            assert "id" not in p and "name" not in p["function"]
        calls[p["index"]]["arguments"] += p["function"]["arguments"]
    assert len(pieces) > len(calls), "arguments come in fragments"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_stream_cut_inside_a_tool_call_resumes_token_exact(fleet) -> None:
    client, _, cut = fleet
    request = dict(
        model="tiny",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
        parallel_tool_calls=False,
        stream=True,
    )

    async def calls() -> tuple[list, list]:
        chunks = [c async for c in await client.chat.completions.create(**request)]
        pieces = [p for c in chunks if c.choices for p in c.choices[0].delta.tool_calls or []]
        return chunks, pieces

    _, whole = await calls()
    assert len(whole) >= 4
    for after in (3, len(whole) // 2):  # right after the name, and mid-arguments
        cut.victim, cut.after_tokens = None, after
        chunks, pieces = await calls()
        assert cut.victim is not None, "the stream was cut"
        assert [p.id for p in pieces if p.id] == [pieces[0].id] and pieces[0].function.name == "get_weather"
        assert "".join(p.function.arguments for p in pieces) == "".join(p.function.arguments for p in whole)
        assert json.loads("".join(p.function.arguments for p in pieces))["unit"] in ("c", "f")
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "tool_calls"
        assert len({c.id for c in chunks}) == 1
        cut.victim = None


async def test_a_stream_cut_inside_json_output_resumes_to_the_same_valid_json(fleet) -> None:
    client, _, cut = fleet
    request = dict(
        model="tiny", messages=ASK, temperature=0, max_tokens=200, response_format=schema_format(PERSON), stream=True
    )

    async def text() -> str:
        chunks = [c async for c in await client.chat.completions.create(**request)]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    whole = await text()
    jsonschema.validate(json.loads(whole), PERSON)
    cut.after_tokens = 10
    assert await text() == whole
    assert cut.victim is not None
