"""Constrained decoding in both engines (lmfleet.engine.grammar): a model that emits noise on its own (the tiny
random LLaMA) or a small real one (SmolLM2 on llama.cpp) produces JSON that validates against the schema, for many
seeds, greedy and sampled, alone and batched beside unconstrained requests that stay as they were."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("llguidance")

from lmfleet.engine.base import EngineRequest, FinishReason, SamplingParams  # noqa: E402
from lmfleet.engine.grammar import GrammarError, Grammars, closed  # noqa: E402
from lmfleet.engine.transformers.engine import TransformersEngine  # noqa: E402
from lmfleet.engine.transformers.tokenizer import HFTokenizer  # noqa: E402
from tests.engine.stepping import drive  # noqa: E402
from tests.fakes import ByteTokenizer  # noqa: E402

# Nested objects, enums, arrays, bounded integers, bounded strings: everything finite, so a noise model finishes.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "integer", "minimum": 10000, "maximum": 99999}, "ok": {"type": "boolean"}},
            "required": ["zip", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def hf(tiny_models) -> tuple[TransformersEngine, Grammars, HFTokenizer]:
    folder = tiny_models["alpha"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    engine = TransformersEngine(model, max_model_len=512)
    tokenizer = HFTokenizer.load(str(folder), eos_token_ids=engine.eos_token_ids)
    return engine, Grammars(tokenizer), tokenizer


@pytest.fixture(scope="module")
def gguf(smollm2_gguf) -> Iterator[tuple[object, Grammars, object]]:
    pytest.importorskip("llama_cpp")
    from lmfleet.engine.llamacpp.engine import LlamaCppEngine
    from lmfleet.engine.llamacpp.tokenizer import GGUFTokenizer

    engine = LlamaCppEngine(str(smollm2_gguf), max_model_len=2048)
    tokenizer = GGUFTokenizer(engine.model)
    yield engine, Grammars(tokenizer), tokenizer
    engine.close()


def constrained(grammars: Grammars, rid: str, prompt: list[int], schema=SCHEMA, **params) -> EngineRequest:
    constraint = grammars.constraint(grammars.json_schema(schema))
    return EngineRequest(rid, prompt, SamplingParams(constraint=constraint, **params))


def check_valid(tokenizer, tokens: list[int], final, schema=SCHEMA) -> dict:
    assert final.finish_reason == FinishReason.STOP, tokenizer.decode(tokens)
    value = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("engine_name", ["hf", "gguf"])
def test_every_seed_gives_json_that_validates_beside_unconstrained_requests(request, engine_name: str) -> None:
    engine, grammars, tokenizer = request.getfixturevalue(engine_name)
    prompt = tokenizer.render_chat([{"role": "user", "content": "Describe a person as JSON."}])
    free = [EngineRequest("free0", prompt, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))]
    alone, _ = drive(engine, free)
    reqs = [constrained(grammars, f"s{seed}", prompt, max_new_tokens=200, seed=seed) for seed in range(8)]
    reqs += [constrained(grammars, "greedy", prompt, max_new_tokens=200, temperature=0.0)]
    reqs += [constrained(grammars, "hot", prompt, max_new_tokens=200, temperature=2.0, top_k=50, seed=7)]
    tokens, final = drive(engine, [*reqs, *free])
    values = [check_valid(tokenizer, tokens[r.request_id], final[r.request_id]) for r in reqs]
    assert len({json.dumps(v) for v in values}) > 1, "sampling still samples inside the grammar"
    assert tokens["free0"] == alone["free0"] or engine_name == "gguf", "an unconstrained row is untouched"
    assert final["free0"].finish_reason == FinishReason.LENGTH


def test_a_resumed_constraint_continues_the_same_json(hf) -> None:
    """A constraint that has consumed the first half of an output (a resumed generation) continues it, greedy, to the
    same valid JSON."""
    engine, grammars, tokenizer = hf
    prompt = tokenizer.render_chat([{"role": "user", "content": "JSON please"}])
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    first, final = drive(engine, [constrained(grammars, "a", prompt, schema, max_new_tokens=100, temperature=0.0)])
    check_valid(tokenizer, first["a"], final["a"], schema)
    half = first["a"][: len(first["a"]) // 2]
    c = grammars.constraint(grammars.json_schema(schema))
    assert c.advance_all(half)
    resumed = EngineRequest("b", prompt + half, SamplingParams(max_new_tokens=100, temperature=0.0, constraint=c))
    rest, final = drive(engine, [resumed])
    check_valid(tokenizer, half + rest["b"], final["b"], schema)
    assert half + rest["b"] == first["a"]


def test_a_schema_llguidance_cannot_compile_is_refused_with_its_reason(hf) -> None:
    _, grammars, _ = hf
    with pytest.raises(GrammarError, match="does not exist"):
        grammars.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})
    with pytest.raises(GrammarError, match="look-around"):
        grammars.json_schema({"type": "string", "pattern": "(?<=x)y"})


def test_real_model_fills_a_schema_sensibly(gguf) -> None:
    engine, grammars, tokenizer = gguf
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    prompt = tokenizer.render_chat(
        [
            {"role": "system", "content": "You are a helpful assistant. Answer in JSON."},
            {"role": "user", "content": "What is the capital of France? Give the city and the country."},
        ]
    )
    tokens, final = drive(engine, [constrained(grammars, "r", prompt, schema, max_new_tokens=80, temperature=0.0)])
    value = check_valid(tokenizer, tokens["r"], final["r"], schema)
    assert "Paris" in value["city"]


def test_strict_mode_closes_every_object_that_does_not_say() -> None:
    """`closed` (OpenAI's strict mode): objects that declare properties take no others unless they say so, nested
    ones and `$defs` too; a property named like a keyword is a property; {"type": "object"} stays any object."""
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "items": {"type": "array", "items": {"$ref": "#/$defs/point"}},
            "open": {"type": "object", "properties": {"b": {"type": "integer"}}, "additionalProperties": True},
            "any": {"type": "object"},
        },
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    strict = closed(schema)
    assert strict["additionalProperties"] is False and "additionalProperties" not in schema  # a copy
    assert strict["properties"]["properties"]["additionalProperties"] is False
    assert set(strict["properties"]["properties"]["properties"]) == {"a"}
    assert strict["$defs"]["point"]["additionalProperties"] is False
    assert strict["properties"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in strict["properties"]["any"]
    grammars = Grammars(ByteTokenizer())  # ids are bytes
    good = {"properties": {"a": 1}, "items": [{"x": 1}], "open": {"b": 1, "c": 2}, "any": {"z": 0}}
    for value, fits in (
        (good, True),
        ({**good, "extra": 1}, False),
        ({**good, "items": [{"x": 1, "y": 2}]}, False),
        ({**good, "properties": {"a": 1, "b": 2}}, False),
    ):
        text = json.dumps(value).encode()
        loose = grammars.constraint(grammars.json_schema(schema))
        tight = grammars.constraint(grammars.json_schema(schema, strict=True))
        assert (loose.advance_all(list(text)), tight.advance_all(list(text))) == (True, fits)
