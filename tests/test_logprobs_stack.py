"""Log probabilities (and logit_bias) through the whole stack in one process (tests/test_stack.py's fleet: API,
controller and two workers over ASGI, scripted engines that report `fake_logprob` per context position): one entry
per output token in OpenAI's shapes, streamed and not, across a resume (nothing re-sent, nothing missing), with stop
strings, and with echo (the prompt's tokens first, the first one null). Shapes are validated against OpenAI's
published schemas."""

from __future__ import annotations

import json

import pytest

from tests import test_stack
from tests.api.fakes import sse_events
from tests.conformance import validate
from tests.fakes import fake_logprob
from tests.test_stack import inside, story

fleet = test_stack.fleet  # the fixture: API, controller and two workers in one process

pytestmark = pytest.mark.timeout(60)
CHAT_PROMPT = b"user: Tell me.\nassistant:"  # the byte tokenizer's chat prompt: one token per byte


def check_chat_entries(entries: list, text: str, k: int, prompt_len: int = len(CHAT_PROMPT)) -> None:
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode()
    for j, e in enumerate(entries):
        expected = fake_logprob(prompt_len + j, e.bytes[0], k)
        assert e.logprob == expected.logprob
        assert [t.logprob for t in e.top_logprobs] == [v for _, v in expected.top]
        assert [t.token for t in e.top_logprobs] == [chr(i) for i, _ in expected.top]
        # a byte that is half of a character is spelled as an escape, never as U+FFFD
        assert e.token == bytes(e.bytes).decode("utf-8", errors="backslashreplace")


async def streamed_entries(client, **kw) -> tuple[str, list, list]:
    text, chunks = await story(client, logprobs=True, top_logprobs=2, **kw)
    entries = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    return text, entries, chunks


async def test_chat_streamed_and_whole(fleet) -> None:
    client, _ = fleet
    text, entries, chunks = await streamed_entries(client)
    assert len(entries) == chunks[-1].usage.completion_tokens == 80
    check_chat_entries(entries, text, 2)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    whole = await client.chat.completions.create(
        model="story",
        messages=[{"role": "user", "content": "Tell me."}],
        temperature=0,
        max_tokens=80,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    validate("CreateChatCompletionResponse", whole.model_dump(mode="json", exclude_unset=True))
    assert whole.choices[0].message.content == text
    assert [e.model_dump() for e in whole.choices[0].logprobs.content] == [e.model_dump() for e in entries]
    plain = await client.chat.completions.create(
        model="story", messages=[{"role": "user", "content": "Tell me."}], max_tokens=4
    )
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(("piece", "into"), [("ï", 1), ("🙂", 2), ("Once", 0)])
async def test_a_resumed_stream_sends_each_tokens_logprob_once(fleet, piece: str, into: int) -> None:
    client, cut = fleet
    whole, expected, _ = await streamed_entries(client)
    cut.after_tokens = inside(whole, piece, into)
    text, entries, _ = await streamed_entries(client)
    assert cut.victim is not None, "the stream was cut"
    assert text == whole
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in expected]


async def test_stop_strings_keep_the_logprobs_of_the_tokens_they_end_on(fleet) -> None:
    """The output ends with the token that completed the stop string (its text cut): one entry per counted token."""
    client, cut = fleet
    text, entries, chunks = await streamed_entries(client, stop=["wörker"])
    assert text.endswith("a ") and len(entries) == chunks[-1].usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries) == (text + "wörker").encode()
    cut.after_tokens = inside(text + "wörker", "wörker", 2)  # after "w" and half of "ö" went out
    again, resumed, _ = await streamed_entries(client, stop=["wörker"])
    assert cut.victim is not None and again == text
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in entries]


def completion_logprobs_are_right(choice: dict, prompt: str, k: int) -> None:
    lp = choice["logprobs"]
    text, n = choice["text"], len(prompt.encode())
    assert text.startswith(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == len(text.encode())  # one token per byte, prompt included
    for p in range(1, len(lp["tokens"])):
        token = text.encode()[p]
        expected = fake_logprob(p if p < n else p, token, k)
        assert lp["token_logprobs"][p] == expected.logprob
        assert lp["top_logprobs"][p] == {**{chr(i): v for i, v in expected.top}, lp["tokens"][p]: expected.logprob}
    # each token starts at its offset in the text (a token inside a character starts after the character's start)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        if len(token) == 1:
            assert text[offset] == token


def schema_view(choice: dict) -> dict:
    """OpenAI's schema types every entry as a number / an object; its API sends null for echo's first token."""
    lp = choice["logprobs"]
    return {
        **choice,
        "logprobs": {
            **lp,
            "token_logprobs": [0.0, *lp["token_logprobs"][1:]],
            "top_logprobs": [{}] + lp["top_logprobs"][1:],
        },
    }


async def test_completions_echo_with_logprobs(fleet) -> None:
    client, _ = fleet
    http = client._client  # plain HTTP: the exact JSON on the wire
    prompt = "Tïny 🙂 prompt"
    request = {"model": "story", "prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 12, "temperature": 0}
    body = (await http.post("http://api/v1/completions", json=request)).json()
    validate("CreateCompletionResponse", {**body, "choices": [schema_view(c) for c in body["choices"]]})
    completion_logprobs_are_right(body["choices"][0], prompt, 3)
    events = sse_events((await http.post("http://api/v1/completions", json={**request, "stream": True})).text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = {"text": "", "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}}
    for chunk in chunks:
        choice = chunk["choices"][0]
        streamed["text"] += choice["text"]
        for key, values in (choice["logprobs"] or {}).items():
            streamed["logprobs"][key] += values
    assert streamed == {"text": body["choices"][0]["text"], "logprobs": body["choices"][0]["logprobs"]}
    no_echo = (await http.post("http://api/v1/completions", json={**request, "echo": False})).json()["choices"][0]
    validate("CreateCompletionResponse", {**body, "choices": [no_echo]})
    assert no_echo["logprobs"]["tokens"] == body["choices"][0]["logprobs"]["tokens"][len(prompt.encode()) :]
    assert no_echo["logprobs"]["text_offset"][0] == 0


async def test_a_logit_bias_outside_the_vocabulary_is_a_400_naming_it(fleet) -> None:
    client, _ = fleet
    http = client._client
    for route, body in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"prompt": "Hi"}),
    ]:
        resp = await http.post(f"http://api{route}", json={"model": "story", "logit_bias": {"257": 5}, **body})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "logit_bias" and "257" in resp.json()["error"]["message"]


@pytest.mark.parametrize("prompt", ["Tïny 🙂 prompt", list("Tïny 🙂 prompt".encode())])
async def test_echo_of_text_and_token_id_prompts_across_a_resume(fleet, prompt) -> None:
    """A token-id prompt is echoed as its text; a stream cut after the echo and a few tokens resumes without
    repeating the prompt or any token's logprob."""
    client, cut = fleet
    http = client._client
    request = {"model": "story", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 40, "stream": True}

    async def streamed() -> tuple[str, list]:
        events = sse_events((await http.post("http://api/v1/completions", json=request)).text)
        assert events[-1] == "[DONE]"
        choices = [json.loads(e)["choices"][0] for e in events[:-1]]
        return "".join(c["text"] for c in choices), [
            t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]
        ]

    text, tokens = await streamed()
    assert text.startswith("Tïny 🙂 prompt") and len(tokens) == len("Tïny 🙂 prompt".encode()) + 40
    cut.after_tokens = 5  # the echo chunk and five tokens went out
    again, resumed_tokens = await streamed()
    assert cut.victim is not None
    assert (again, resumed_tokens) == (text, tokens)
