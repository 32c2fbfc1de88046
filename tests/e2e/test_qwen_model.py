"""A second real architecture end to end: Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M GGUF, a 151k byte-level BPE
vocabulary, its own ChatML template; scripts/real_models.py assembles it) served by two llama.cpp workers behind
real controller and API processes, asked with the official `openai` client: structured output, log probabilities,
the serving invariants (streamed text equals non-streamed text, the same seed gives the same text, `n` gives
several choices, a stop string ends the answer before it), OpenAI's schemas, and a worker killed mid-stream while
the other one resumes the stream token-exact. Also, opt-in (`pytest -m qwen15`), the 1.5B model answering a chat.

Answers compared across requests are greedy answers the model gives with a wide margin: llama.cpp's logits move a
little with what the prefix cache holds (README, Performance), which can flip a near-tie, and the requests here go
to either replica at random.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.conformance import validate
from tests.conftest import Fleet
from tests.e2e.replicas import assert_a_killed_stream_resumes_token_exact, llamacpp_replicas

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

MODEL = "qwen"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# Greedy answers: 'The capital of France is Paris.' and 'I love 🍕 and ☕!', each token ahead of the runner-up by at
# least 3 in logprob (measured; a 'Translate into Japanese' prompt was 0.09). Byte-level BPE spells the pizza's four
# UTF-8 bytes over tokens that are not whole characters, so detokenizing a stream must hold half a character back.
FRANCE = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
PIZZA = [SYSTEM, {"role": "user", "content": "Repeat exactly, with nothing else: I love 🍕 and ☕!"}]
CAPITAL = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


class Capital(pydantic.BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def fleet(qwen05_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with llamacpp_replicas(qwen05_gguf, MODEL, tmp_path_factory.mktemp("qwen")) as f:
        yield f


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)


def ask(client: openai.OpenAI, messages=FRANCE, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("max_tokens", 32)
    return client.chat.completions.create(messages=messages, **kw)


def test_it_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = ask(client, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens > 10


def test_json_schema_output_and_the_official_parse(client: openai.OpenAI) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "capital", "strict": True, "schema": CAPITAL}}
    reply = ask(client, temperature=0, max_tokens=40, response_format=schema)
    answer = json.loads(reply.choices[0].message.content)
    jsonschema.validate(answer, CAPITAL)
    assert answer["city"] == "Paris" and reply.choices[0].finish_reason == "stop"
    parsed = client.chat.completions.parse(
        model=MODEL, messages=FRANCE, response_format=Capital, temperature=0, max_tokens=40
    )
    capital = parsed.choices[0].message.parsed
    assert isinstance(capital, Capital) and capital.city == "Paris" and capital.country == "France"


def test_chat_logprobs_spell_the_answer_and_greedy_picks_the_top_token(client: openai.OpenAI) -> None:
    reply = ask(client, PIZZA, temperature=0, max_tokens=16, logprobs=True, top_logprobs=3)
    validate("CreateChatCompletionResponse", reply.model_dump(mode="json", exclude_unset=True))
    text, entries = reply.choices[0].message.content, reply.choices[0].logprobs.content
    assert "🍕" in text and len(entries) == reply.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text  # half characters add up to whole ones
    assert any("\\x" in e.token for e in entries)  # a token that is part of a character is spelled in escapes
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert math.isfinite(e.logprob) and e.logprob == e.top_logprobs[0].logprob <= 0
        ranked = [t.logprob for t in e.top_logprobs]
        assert all(math.isfinite(v) for v in ranked) and ranked == sorted(ranked, reverse=True)


def test_completions_echo_scores_the_prompt_and_greedy_picks_the_top_token(fleet: Fleet) -> None:
    """Echo with logprobs: every prompt token but the first scored (Qwen puts no BOS first), the generated ones
    each the most likely; a likely ending scores higher than an unlikely one."""
    prefix = "The capital of France is"
    scores = {}
    for ending in (" Paris.", " a potato."):
        body = {"model": MODEL, "prompt": prefix + ending, "echo": True, "logprobs": 2, "max_tokens": 4}
        resp = httpx.post(fleet.api_url + "/v1/completions", json={**body, "temperature": 0}, timeout=60).json()
        choice, usage = resp["choices"][0], resp["usage"]
        lp = choice["logprobs"]
        assert choice["text"].startswith(prefix + ending)
        assert "".join(lp["tokens"]) == choice["text"]
        assert len(lp["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(math.isfinite(v) and v <= 0 for v in lp["token_logprobs"][1:])
        for i in range(usage["prompt_tokens"], len(lp["tokens"])):  # generated: the chosen one is the top one
            top = lp["top_logprobs"][i]
            assert max(top, key=top.get) == lp["tokens"][i] and top[lp["tokens"][i]] == lp["token_logprobs"][i]
        offsets = lp["text_offset"]
        ending_tokens = [i for i in range(usage["prompt_tokens"]) if offsets[i] >= len(prefix)]
        scores[ending] = sum(lp["token_logprobs"][i] for i in ending_tokens)
    assert scores[" Paris."] > scores[" a potato."]


def test_streamed_text_equals_non_streamed_text(client: openai.OpenAI) -> None:
    whole = ask(client, PIZZA, temperature=0, max_tokens=16).choices[0].message.content
    chunks = list(ask(client, PIZZA, temperature=0, max_tokens=16, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole and "🍕" in whole and "\ufffd" not in whole


def test_the_same_seed_gives_the_same_text_and_n_gives_several(client: openai.OpenAI) -> None:
    body = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12)
    first, again = ask(client, **body), ask(client, **body)
    assert first.choices[0].message.content == again.choices[0].message.content
    two = ask(client, n=2, **body)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
    assert two.usage.prompt_tokens == first.usage.prompt_tokens  # one prompt, counted once
    assert first.usage.completion_tokens < two.usage.completion_tokens <= 2 * 12  # both choices counted


@pytest.mark.parametrize(
    ("messages", "stop"),
    [(FRANCE, "is Par"), (PIZZA, "🍕 and")],
    ids=["inside-a-word", "inside-a-character"],
)
def test_a_stop_string_ends_the_answer_before_it(client: openai.OpenAI, messages, stop: str) -> None:
    """The stop string starts inside a token (' Paris'; the pizza's first bytes) and spans several: the answer,
    streamed or not, is the unstopped answer cut where the stop string begins."""
    whole = ask(client, messages, temperature=0).choices[0].message.content
    reply = ask(client, messages, temperature=0, stop=[stop])
    assert stop in whole and reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == whole[: whole.index(stop)]
    chunks = list(ask(client, messages, temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole[: whole.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_answers_and_stream_chunks_validate_against_openais_schemas(fleet: Fleet) -> None:
    body = {"model": MODEL, "messages": PIZZA, "max_tokens": 16, "temperature": 0}
    resp = httpx.post(fleet.api_url + "/v1/chat/completions", json=body, timeout=60)
    validate("CreateChatCompletionResponse", resp.json())
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fleet.api_url + "/v1/chat/completions", json=stream, timeout=60) as resp:
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    for event in events[:-1]:
        validate("CreateChatCompletionStreamResponse", json.loads(event))
    completion = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "logprobs": 2}
    resp = httpx.post(fleet.api_url + "/v1/completions", json=completion, timeout=60)
    validate("CreateCompletionResponse", resp.json())  # not with echo: the schema has no null for its first token


# An answer longer than the 64 tokens the resume test streams (ignore_eos). The France answer ends after 8 tokens, so
# the stream ran on past the model's end, where the next token is a near-tie that a prefill of the resumed ids (not
# bit-equal to decoding them) can flip: the test then failed by the kernels' arithmetic, not by lost tokens.
COUNT = [SYSTEM, {"role": "user", "content": "Count from 1 to 40, separated by commas, with nothing else."}]


def test_a_killed_llamacpp_worker_stream_resumes_token_exact_on_the_other(fleet: Fleet, client) -> None:
    assert_a_killed_stream_resumes_token_exact(fleet, client, MODEL, COUNT)  # the fleet keeps one replica


@pytest.fixture(scope="module")
def fleet15(qwen15_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with llamacpp_replicas(qwen15_gguf, MODEL, tmp_path_factory.mktemp("qwen15"), replicas=1) as f:
        yield f


@pytest.mark.qwen15
def test_the_1_5b_model_answers_a_chat_and_streams_the_same_answer(fleet15: Fleet) -> None:
    client = openai.OpenAI(base_url=fleet15.api_url + "/v1", api_key="none", max_retries=0)
    whole = ask(client, temperature=0).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, temperature=0, stream=True) if c.choices)
    assert "Paris" in whole and streamed == whole
