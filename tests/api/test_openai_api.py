"""The API server as OpenAI clients use it: the official `openai` client (and plain HTTP where the wire matters)
against `create_app` in process, with a fake controller and fake workers (tests/api/fakes.py)."""

from __future__ import annotations

import json

from lmfleet.api.app import ApiSettings

from .fakes import Fleet, expected_reply, serve, sse_events

QUESTION = "What is deep learning?"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": QUESTION}]


async def test_models_list_and_retrieve() -> None:
    async with serve(Fleet({"echo": ["a"], "other": ["b"]})) as api:
        page = await api.openai.models.list()
        assert [m.id for m in page.data] == ["echo", "other"]
        assert {(m.object, m.owned_by) for m in page.data} == {("model", "lmfleet")}
        assert all(isinstance(m.created, int) and m.created > 0 for m in page.data)
        raw = (await api.raw.get("/v1/models")).json()
        assert raw["object"] == "list"
        assert (await api.openai.models.retrieve("other")).id == "other"


async def test_chat_completion() -> None:
    async with serve() as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "echo"
        (choice,) = out.choices
        assert choice.index == 0 and choice.message.role == "assistant"
        assert choice.message.content == expected_reply(QUESTION)
        assert choice.finish_reason == "stop"
        assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 4 and out.usage.total_tokens == 8


async def test_max_tokens_gives_length() -> None:
    async with serve() as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=2)
        assert out.choices[0].message.content == "What is"
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 2
        out = await api.openai.completions.create(model="echo", prompt="a b c d e f", max_tokens=3)
        assert out.choices[0].text == "a b c" and out.choices[0].finish_reason == "length"


async def test_chat_stream_equals_non_stream() -> None:
    async with serve() as api:
        whole = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, seed=3)
        chunks = [
            c
            async for c in await api.openai.chat.completions.create(
                model="echo", messages=MESSAGES, seed=3, stream=True
            )
        ]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in chunks[1:])
        assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


async def test_completion_stream_equals_non_stream() -> None:
    async with serve() as api:
        whole = await api.openai.completions.create(model="echo", prompt="one two three four", max_tokens=10)
        assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
        chunks = [
            c
            async for c in await api.openai.completions.create(
                model="echo", prompt="one two three four", max_tokens=10, stream=True
            )
        ]
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text == "one two three four"
        assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"text_completion"}
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_sse_wire_format() -> None:
    async with serve() as api:
        body = {"model": "echo", "messages": MESSAGES, "stream": True}
        resp = await api.raw.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        first = json.loads(events[0])
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": "What"}
        assert first["choices"][0]["finish_reason"] is None


async def test_n2_choices_differ_and_are_reproducible() -> None:
    fleet = Fleet({"echo": ["a", "b"]})  # the controller spreads the choices over both workers
    async with serve(fleet) as api:
        out = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, n=2, seed=7)
        assert [c.index for c in out.choices] == [0, 1]
        texts = [c.message.content for c in out.choices]
        assert texts == [expected_reply(QUESTION, seed=7), expected_reply(QUESTION, seed=8)]
        assert texts[0] != texts[1]
        assert out.usage.prompt_tokens == 4  # one prompt, counted once
        assert out.usage.completion_tokens == 8
        seeds = sorted(r.seed for w in fleet.workers.values() for r in w.requests)
        assert seeds == [7, 8] and all(len(w.requests) == 1 for w in fleet.workers.values())

        again = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, n=2, seed=7)
        assert [c.message.content for c in again.choices] == texts

        chunks = [
            c
            async for c in await api.openai.chat.completions.create(
                model="echo", messages=MESSAGES, n=2, seed=7, stream=True
            )
        ]
        streamed = {0: "", 1: ""}
        roles: dict[int, list[str | None]] = {0: [], 1: []}
        finishes = {}
        for c in chunks:
            (choice,) = c.choices
            streamed[choice.index] += choice.delta.content or ""
            roles[choice.index].append(choice.delta.role)
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        assert [streamed[0], streamed[1]] == texts
        assert all(r[0] == "assistant" and set(r[1:]) <= {None} for r in roles.values())
        assert finishes == {0: "stop", 1: "stop"}


async def test_include_usage_adds_final_usage_chunk() -> None:
    async with serve() as api:
        whole = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, n=2)
        chunks = [
            c
            async for c in await api.openai.chat.completions.create(
                model="echo", messages=MESSAGES, n=2, stream=True, stream_options={"include_usage": True}
            )
        ]
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert last.usage.model_dump() == whole.usage.model_dump()
        assert all(c.usage is None for c in chunks[:-1])

        chunks = [
            c
            async for c in await api.openai.completions.create(
                model="echo", prompt="a b", stream=True, stream_options={"include_usage": True}
            )
        ]
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 4


async def test_fastchat_root_without_model() -> None:
    """FastChat's README posts this request.json to `/` with no model; exactly one model is served."""
    async with serve() as api:
        resp = await api.raw.post("/", json={"messages": MESSAGES, "max_tokens": 100})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
        assert body["object"] == "chat.completion" and body["model"] == "echo" and isinstance(body["created"], int)
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "stop"
        assert choice["message"] == {"role": "assistant", "content": expected_reply(QUESTION), "refusal": None}
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}


async def test_default_model_is_used_when_none_is_named() -> None:
    async with serve(Fleet({"echo": ["a"], "other": ["b"]}), default_model="other") as api:
        resp = await api.raw.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert resp.status_code == 200 and resp.json()["model"] == "other"
        assert len(api.fleet.workers["b"].requests) == 1


async def test_completions_prompt_forms_and_choice_order() -> None:
    async with serve() as api:
        out = await api.openai.completions.create(model="echo", prompt=["a b c", "d e"], n=2, seed=0, max_tokens=5)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert [c.text for c in out.choices] == ["a b c", "b c a", "d e", "e d"]  # prompt-major, seed + j
        assert out.usage.prompt_tokens == 5  # 3 + 2: each prompt once, not once per choice
        assert out.usage.completion_tokens == 10

        out = await api.openai.completions.create(model="echo", prompt=[5, 6, 7])
        assert out.choices[0].text == "t5 t6 t7"
        assert api.fleet.workers["a"].requests[-1].prompt_token_ids == [5, 6, 7]

        out = await api.openai.completions.create(model="echo", prompt=[[1], [2, 3]])
        assert [c.text for c in out.choices] == ["t1", "t2 t3"]

        out = await api.openai.completions.create(model="echo", prompt="x y", echo=True)
        assert out.choices[0].text == "x yx y"  # the prompt, then the completion


async def test_request_translation_to_worker() -> None:
    async with serve() as api:
        await api.openai.chat.completions.create(
            model="echo",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
            ],
            temperature=0.2,
            top_p=0.9,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            stop="END",
            max_tokens=50,
            max_completion_tokens=7,
            seed=11,
            user="u-1",
            metadata={"k": "v"},
            logit_bias={"5": 10, "7": -100},
            logprobs=True,
            top_logprobs=3,
            extra_body={"top_k": 40, "ignore_eos": True, "min_p": 0.2},
        )
        (req,) = api.fleet.workers["a"].requests
        assert req.logit_bias == {5: 10.0, 7: -100.0} and req.min_p == 0.2 and req.logprobs == 3
        assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "first\nsecond")]
        assert (req.temperature, req.top_p, req.top_k) == (0.2, 0.9, 40)
        assert (req.presence_penalty, req.frequency_penalty) == (0.5, -0.5)
        assert req.stop == ["END"] and req.seed == 11 and req.ignore_eos
        assert req.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
        assert req.model == "echo" and req.prompt is None

        # JSON nulls mean "default", as with OpenAI; -1 is vLLM's "top_k off"
        resp = await api.raw.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": MESSAGES, "temperature": None, "n": None, "top_k": -1, "stop": None},
        )
        assert resp.status_code == 200, resp.text
        req = api.fleet.workers["a"].requests[-1]
        assert (req.temperature, req.top_k, req.stop, req.max_tokens) == (1.0, 0, [], None)
        assert (req.logit_bias, req.min_p, req.logprobs) == ({}, 0.0, None)


async def test_unknown_fields_are_ignored() -> None:
    async with serve() as api:
        body = {
            "model": "echo",
            "messages": MESSAGES,
            "store": False,
            "service_tier": "auto",
            "parallel_tool_calls": True,
            "some_new_openai_field": {"x": 1},
        }
        resp = await api.raw.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text


async def test_openapi_documents_the_api_without_422() -> None:
    async with serve() as api:
        schema = (await api.raw.get("/openapi.json")).json()
        assert "ChatCompletionRequest" in schema["components"]["schemas"]
        assert "CompletionRequest" in schema["components"]["schemas"]
        chat = schema["paths"]["/v1/chat/completions"]["post"]
        assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
        assert "400" in chat["responses"] and "422" not in json.dumps(schema["paths"])
        assert "HTTPValidationError" not in schema["components"]["schemas"]
        docs = await api.raw.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_settings_never_print_secrets() -> None:
    s = ApiSettings(
        api_keys=["sk-very-secret"],
        registration_secret="reg-very-secret",
        controller_address="http://c1:21001, http://c2:21001",
    )
    assert "very-secret" not in repr(s)
    assert s.controller_addresses == ["http://c1:21001", "http://c2:21001"]
