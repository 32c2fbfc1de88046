"""Every way a request can fail gets an OpenAI-shaped error (`{"error": {message, type, param, code}}`) with the
right status, before any answer starts; failures after the answer started are SSE error events."""

from __future__ import annotations

import json

import openai
import pytest

from .fakes import Fleet, assert_error, serve, sse_events

MESSAGES = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "echo", "messages": MESSAGES}


async def test_malformed_json_is_400() -> None:
    async with serve() as api:
        resp = await api.raw.post(
            "/v1/chat/completions",
            content=b'{"model": "echo", "messages": [',
            headers={"content-type": "application/json"},
        )
        err = assert_error(resp, 400, type_="invalid_request_error")
        assert "JSON" in err["message"]
        resp = await api.raw.post(
            "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}
        )
        assert_error(resp, 400)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": ["x" * 257]}, "stop.0"),
        ({"seed": "abc"}, "seed"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
        ),
        ({"model": ""}, "model"),
        ({"stream": "yes"}, "stream"),
    ],
)
async def test_bad_values_are_400_naming_the_param(patch: dict, param: str) -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, **patch})
        assert_error(resp, 400, param=param, type_="invalid_request_error")
        assert api.fleet.workers["a"].requests == []  # nothing reached a worker


async def test_image_part_message_says_what_is_supported() -> None:
    async with serve() as api:
        content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "x"}}]
        body = {**CHAT, "messages": [{"role": "user", "content": content}]}
        resp = await api.raw.post("/v1/chat/completions", json=body)
        err = assert_error(resp, 400, param="messages.0.content")
        assert "image_url" in err["message"] and "text" in err["message"]


F = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    ("route", "patch", "param"),
    [
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
        ),
        ("/v1/chat/completions", {"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"tools": [F], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"tools": [F], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
        ("/v1/chat/completions", {"logit_bias": {"50256": -101}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"the": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"-1": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("/v1/chat/completions", {"min_p": 1.5}, "min_p"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"suffix": "and then"}, "suffix"),
        ("/v1/completions", {"logit_bias": {"1": "5"}}, "logit_bias"),
        ("/v1/completions", {"min_p": -0.1}, "min_p"),
        ("/v1/completions", {"prompt": ["p"] * 20, "n": 4}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ],
)
async def test_unsupported_features_are_400_naming_the_param(route: str, patch: dict, param: str) -> None:
    base = CHAT if "chat" in route else {"model": "echo", "prompt": "hello"}
    async with serve() as api:
        resp = await api.raw.post(route, json={**base, **patch})
        assert_error(resp, 400, param=param)


async def test_accepted_off_values() -> None:
    off = {
        "logprobs": False,
        "top_logprobs": 0,
        "tools": [],
        "tool_choice": "none",
        "logit_bias": {},
        "response_format": {"type": "text"},
        "modalities": ["text"],
    }
    async with serve() as api:
        assert (await api.raw.post("/v1/chat/completions", json={**CHAT, **off})).status_code == 200
        body = {"model": "echo", "prompt": "hi", "best_of": 1, "suffix": "", "logprobs": None}
        assert (await api.raw.post("/v1/completions", json=body)).status_code == 200


async def test_unknown_model_is_404() -> None:
    async with serve() as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
        err = assert_error(resp, 404, param="model", code="model_not_found")
        assert "gpt-9" in err["message"]
        with pytest.raises(openai.NotFoundError):
            await api.openai.chat.completions.create(model="gpt-9", messages=MESSAGES)
        assert_error(await api.raw.get("/v1/models/gpt-9"), 404, param="model", code="model_not_found")


async def test_model_required_when_several_are_served() -> None:
    async with serve(Fleet({"echo": ["a"], "other": ["b"]})) as api:
        resp = await api.raw.post("/v1/chat/completions", json={"messages": MESSAGES})
        err = assert_error(resp, 400, param="model")
        assert "echo" in err["message"] and "other" in err["message"]


async def test_model_whose_workers_are_gone_is_503_not_404() -> None:
    """A model served a moment ago whose replicas are all gone (restarting) is a retryable 503."""
    fleet = Fleet({"echo": ["a"], "idle": ["b"]})
    async with serve(fleet) as api:
        assert (await api.raw.post("/v1/chat/completions", json={**CHAT, "model": "idle"})).status_code == 200
        fleet.controller.models["idle"] = []  # its only worker expired
        await api.router.refresh()
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "model": "idle"})
        assert_error(resp, 503, code="no_worker_available", type_="service_unavailable_error")
        assert resp.headers["retry-after"]


async def test_controller_unreachable_is_503() -> None:
    async with serve(controller_address="http://nowhere.test") as api:
        assert_error(await api.raw.post("/v1/chat/completions", json=CHAT), 503)
        assert_error(await api.raw.get("/v1/models"), 503)


async def test_worker_unreachable_is_502() -> None:
    fleet = Fleet()
    fleet.controller.models["echo"] = ["http://gone.test"]
    async with serve(fleet) as api:
        assert_error(await api.raw.post("/v1/chat/completions", json=CHAT), 502, type_="upstream_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_worker_context_length_error_passes_through(stream: bool) -> None:
    fleet = Fleet()
    worker_err = {
        "message": "This model's maximum context length is 64 tokens. However, you requested 900 tokens.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "context_length_exceeded",
    }
    fleet.all_workers(reject=(400, {"error": worker_err}))
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "max_tokens": 900, "stream": stream})
        err = assert_error(resp, 400, param="max_tokens", code="context_length_exceeded")
        assert err == worker_err  # unchanged; and a plain JSON error even when streaming was asked for
        with pytest.raises(openai.BadRequestError) as info:
            await api.openai.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=900, stream=stream)
        assert info.value.code == "context_length_exceeded"


async def test_worker_at_capacity_is_429_with_retry_after() -> None:
    fleet = Fleet()
    fleet.all_workers(
        reject=(
            429,
            {
                "error": {
                    "message": "server is at capacity, retry later",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": "queue_full",
                }
            },
        )
    )
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/completions", json={"model": "echo", "prompt": "hi", "stream": True})
        assert_error(resp, 429, code="queue_full", type_="rate_limit_error")
        assert resp.headers["retry-after"]


async def test_a_full_worker_is_skipped_for_another() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.workers["b"].reject = (429, {"error": {"message": "busy", "type": "rate_limit_error"}})
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True})
        assert resp.status_code == 200 and sse_events(resp.text)[-1] == "[DONE]"
        assert len(fleet.workers["a"].requests) == 2  # both choices ended up on `a`
        assert not api.router.is_ejected(fleet.workers["b"].address)  # full is not broken


@pytest.mark.parametrize("then", ["error_chunk", "abort", "break", "garbage"])
async def test_failure_after_first_chunk_is_an_sse_error_event(then: str) -> None:
    fleet = Fleet()
    fleet.all_workers(then=then)
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status_code == 200
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        first, error = json.loads(events[0]), json.loads(events[-2])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["type"] == "upstream_error"

        stream = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass

        # without streaming, the same failure is a plain 502
        assert_error(await api.raw.post("/v1/chat/completions", json=CHAT), 502, type_="upstream_error")


async def test_wrong_method_and_unknown_route_have_the_error_shape() -> None:
    async with serve() as api:
        assert_error(await api.raw.get("/v1/chat/completions"), 405)
        assert_error(await api.raw.delete("/v1/models"), 405)
        assert_error(await api.raw.get("/v1/nothing-here"), 404)


async def test_body_over_the_limit_is_413() -> None:
    async with serve(max_request_bytes=1000) as api:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        assert_error(await api.raw.post("/v1/chat/completions", json=big), 413)

        async def chunked():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(10):
                yield b" " * 200

        assert_error(
            await api.raw.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}),
            413,
        )
        assert (await api.raw.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert api.fleet.workers["a"].requests and len(api.fleet.workers["a"].requests) == 1


async def test_api_keys() -> None:
    keys = ["sk-first", "sk-second"]
    async with serve(api_keys=keys, api_key="sk-second") as api:
        for headers in (
            {},
            {"Authorization": "Bearer sk-wrong"},
            {"Authorization": "sk-first"},
            {"Authorization": "Basic sk-first"},
            {"Authorization": "Bearer sk-first-and-more"},
        ):
            for method, path in (
                ("POST", "/v1/chat/completions"),
                ("GET", "/v1/models"),
                ("POST", "/"),
                ("POST", "/v1/completions"),
            ):
                resp = await api.raw.request(method, path, json=CHAT, headers=headers)
                err = assert_error(resp, 401, code="invalid_api_key")
                assert "sk-" not in err["message"]  # the presented key is never echoed
        # even a malformed body gets the 401 first: nothing is parsed for an unauthenticated client
        assert_error(await api.raw.post("/v1/chat/completions", content=b"{"), 401)

        ok = await api.raw.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-first"})
        assert ok.status_code == 200
        assert (await api.openai.chat.completions.create(model="echo", messages=MESSAGES)).choices  # sk-second
        for public in ("/health", "/docs", "/openapi.json"):
            assert (await api.raw.get(public)).status_code == 200

    async with serve(api_keys=keys, api_key="sk-nope") as api:
        with pytest.raises(openai.AuthenticationError):
            await api.openai.models.list()


async def test_cors_only_when_origins_are_set() -> None:
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with serve(allow_origins=["https://app.example"], api_keys=["sk-k"]) as api:
        resp = await api.raw.options("/v1/chat/completions", headers=preflight)
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
    async with serve() as api:
        resp = await api.raw.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in resp.headers


async def test_echo_takes_text_and_token_id_prompts() -> None:
    from lmfleet.protocol.openai import CompletionRequest

    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "echo": True}).echo
    assert CompletionRequest.model_validate({"model": "m", "prompt": "ab", "echo": True}).echo
