"""The worker's HTTP shell over a scripted engine and a byte tokenizer: validation, streaming, stop strings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from lmfleet.worker.app import WorkerSettings, create_app
from tests.api.fakes import StreamingASGITransport
from tests.fakes import ScriptedEngine, loaded, running

SCRIPT = "Hello wörld 🙂 again."


@pytest.fixture
async def worker() -> AsyncIterator[tuple[httpx.AsyncClient, ScriptedEngine]]:
    engine = ScriptedEngine(SCRIPT, max_model_len=256)
    settings = WorkerSettings(model_path="fake", worker_address="http://worker", controller_addresses=[], max_queued=4)
    app = create_app(settings, load=lambda _s: loaded(engine))
    async with running(app) as (asgi, _):
        async with httpx.AsyncClient(transport=StreamingASGITransport(asgi), base_url="http://worker") as client:
            yield client, engine


async def settles(check, limit_s: float = 5.0) -> bool:
    for _ in range(int(limit_s / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def generate(client: httpx.AsyncClient, **body) -> tuple[int, list[dict]]:
    body.setdefault("request_id", "r1")
    async with client.stream("POST", "/worker/generate", json=body) as resp:
        lines = [json.loads(line) async for line in resp.aiter_lines() if line]
        return resp.status_code, lines


async def test_streams_text_and_token_ids(worker) -> None:
    client, _ = worker
    status, chunks = await generate(client, prompt="hi")
    assert status == 200
    assert "".join(c["text"] for c in chunks) == SCRIPT
    assert sum((c["token_ids"] for c in chunks), []) == list(SCRIPT.encode())
    assert [c["finish_reason"] for c in chunks][-1] == "stop" and chunks[-1]["stop_string"] is None  # the end
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["completion_tokens"] == len(SCRIPT.encode())
    assert chunks[-1]["prompt_tokens"] == 2


async def test_chat_messages_use_the_template_and_max_tokens_gives_length(worker) -> None:
    client, _ = worker
    status, chunks = await generate(client, messages=[{"role": "user", "content": "hey"}], max_tokens=5)
    assert status == 200
    assert "".join(c["text"] for c in chunks) == "Hello"
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["prompt_tokens"] == len("user: hey\nassistant:")


async def test_stop_string_is_cut_and_the_sequence_freed(worker) -> None:
    client, engine = worker
    status, chunks = await generate(client, prompt="x", stop=["wörld"], ignore_eos=True, max_tokens=100)
    assert status == 200
    assert "".join(c["text"] for c in chunks) == "Hello "
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["stop_string"] == "wörld"  # which one ended it
    assert await settles(lambda: not engine.running)  # aborted at the engine's next step
    assert (await client.get("/worker/status")).json()["running"] == 0


async def test_the_status_reports_the_prompt_prefixes_served_most_recently_last(worker) -> None:
    client, _ = worker
    assert (await client.get("/worker/status")).json()["prefix_hashes"] == []
    await generate(client, prompt="a", prefix_hashes=[11, 12])
    await generate(client, prompt="b", prefix_hashes=[21, 11])
    assert (await client.get("/worker/status")).json()["prefix_hashes"] == [12, 21, 11]
    status, _ = await generate(client, prompt="x" * 300, prefix_hashes=[99])  # refused: not served, not reported
    assert status == 400
    assert 99 not in (await client.get("/worker/status")).json()["prefix_hashes"]


async def test_tokenize_renders_the_tools_as_a_generation_does() -> None:
    engine = ScriptedEngine(SCRIPT, max_model_len=4096)  # the generic tool prompt is long in bytes
    settings = WorkerSettings(model_path="fake", worker_address="http://worker", controller_addresses=[])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"}]
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    async with running(create_app(settings, load=lambda _s: loaded(engine))) as (asgi, _):
        async with httpx.AsyncClient(transport=StreamingASGITransport(asgi), base_url="http://worker") as client:
            with_tools = (await client.post("/worker/tokenize", json={"messages": messages, "tools": tools})).json()
            without = (await client.post("/worker/tokenize", json={"messages": messages})).json()
            status, chunks = await generate(client, messages=messages, tools=tools, tool_choice="auto", max_tokens=1)
    assert status == 200, chunks
    assert len(with_tools["tokens"]) == chunks[-1]["prompt_tokens"] > len(without["tokens"])


async def test_echo_prepends_the_prompt(worker) -> None:
    client, _ = worker
    _, chunks = await generate(client, prompt="Say: ", echo=True, max_tokens=5)
    assert "".join(c["text"] for c in chunks) == "Say: Hello"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x" * 300}, "messages"),
        ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),
    ],
)
async def test_context_length_is_a_400_before_streaming(worker, body, param) -> None:
    client, _ = worker
    resp = await client.post("/worker/generate", json={"request_id": "r", **body})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "body",
    [
        {},  # no prompt at all
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # two prompts
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "max_tokens": "many"},
        {"prompt_token_ids": [1, 99999]},  # outside the vocabulary
        {"messages": []},
    ],
)
async def test_bad_requests_are_openai_shaped_400s(worker, body) -> None:
    client, _ = worker
    resp = await client.post("/worker/generate", json={"request_id": "r", **body})
    assert resp.status_code == 400, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


async def test_status_routes(worker) -> None:
    client, _ = worker
    status = (await client.get("/worker/status")).json()
    assert status["model_names"] == ["fake"] and status["context_length"] == 256
    assert status["engine"] == "scripted"
    fastchat = (await client.post("/worker_get_status")).json()  # FastChat's three fields, and lmfleet's
    assert {k: fastchat[k] for k in ("model_names", "speed", "queue_length")} == {
        "model_names": ["fake"],
        "speed": 1.0,
        "queue_length": 0,
    }
    assert fastchat == status
    assert (await client.get("/ready")).json() == {"status": "ready"}


async def test_a_full_queue_is_a_429_with_retry_after_at_once(worker) -> None:
    client, engine = worker
    engine.step_s = 0.01
    body = {"prompt": "x", "ignore_eos": True, "max_tokens": 200}
    streams = [client.stream("POST", "/worker/generate", json={"request_id": f"r{i}", **body}) for i in range(4)]
    responses = [await s.__aenter__() for s in streams]  # four running: the worker's limit
    try:
        assert all(r.status_code == 200 for r in responses)
        resp = await client.post("/worker/generate", json={"request_id": "r5", **body})
        assert resp.status_code == 429
        assert resp.json()["error"]["type"] == "rate_limit_error" and int(resp.headers["retry-after"]) >= 1
    finally:
        for s in streams:
            await s.__aexit__(None, None, None)
    assert await settles(lambda: not engine.running)  # the hung-up streams were aborted


@pytest.mark.parametrize(
    ("advertised", "controllers", "warned"),
    [
        ("http://127.0.0.1:21002", ["http://10.213.0.21:21001"], True),
        ("http://localhost:21002", ["http://127.0.0.1:21001", "http://ctl.example:21001"], True),
        ("http://0.0.0.0:21002", ["http://10.213.0.21:21001"], True),  # --host 0.0.0.0 without --worker-address
        ("http://[::1]:21002", ["http://[fd00::21]:21001"], True),
        ("http://10.213.0.31:21002", ["http://10.213.0.21:21001"], False),
        ("http://127.0.0.1:21002", ["http://127.0.0.1:21001", "http://localhost:21001"], False),  # one machine
    ],
)
async def test_a_worker_advertising_a_loopback_address_to_another_host_is_warned_at_start(
    advertised: str, controllers: list[str], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = WorkerSettings(
        model_path="fake", worker_address=advertised, controller_addresses=controllers, heartbeat_interval_s=60
    )
    refusing = httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: httpx.Response(503)))
    app = create_app(settings, load=lambda _s: loaded(ScriptedEngine(SCRIPT)), http_client=refusing)
    with caplog.at_level("WARNING", logger="lmfleet.worker"):
        async with running(app):
            pass
    await refusing.aclose()
    lines = [r.getMessage() for r in caplog.records if "cannot reach it" in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert advertised in lines[0] and "--worker-address" in lines[0]
