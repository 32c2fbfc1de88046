"""The worker's side of failover: the first chunk says what the prompt's token ids are; a generation resumed from
another replica's ids continues with exactly the text the client has not got (a held-back half UTF-8 character or
stop-string prefix included, nothing twice); and the drain (503 for new requests, leave the controllers, let the
open streams finish)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from lmfleet.drain import Drain
from lmfleet.engine.base import EngineOutput, EngineRequest, EngineStats, FinishReason
from lmfleet.worker.app import WorkerSettings, create_app
from lmfleet.worker.textgen import TextStream
from tests.api.fakes import StreamingASGITransport
from tests.fakes import EOS, ByteTokenizer, PausingEngine, loaded, running

SCRIPT = "Hello wörld 🙂 again."
SCRIPT_IDS = list(SCRIPT.encode())
PROMPT = [ord("x")]  # the prompt "x" in the byte tokenizer


class ContinuingEngine:
    """Generates SCRIPT from the position the context leaves it at (context length - prompt length), so a request
    that carries earlier output as context continues it, as a deterministic model would."""

    def __init__(self, prompt_len: int = len(PROMPT)) -> None:
        self.prompt_len = prompt_len
        self.running: dict[str, tuple[EngineRequest, int, int]] = {}  # id -> (request, position, generated)
        self.aborted: set[str] = set()

    max_model_len = 256
    eos_token_ids = (EOS,)
    vocab_size = EOS + 1

    def add_request(self, request: EngineRequest) -> None:
        self.running[request.request_id] = (request, len(request.prompt_token_ids) - self.prompt_len, 0)

    def abort_request(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def step(self) -> list[EngineOutput]:
        outs = []
        for rid, (req, pos, made) in list(self.running.items()):
            if rid in self.aborted or pos >= len(SCRIPT_IDS):
                del self.running[rid]
                outs.append(EngineOutput(rid, [], FinishReason.ABORT if rid in self.aborted else FinishReason.STOP))
                continue
            made += 1
            if made >= req.params.max_new_tokens:
                del self.running[rid]
                outs.append(EngineOutput(rid, [SCRIPT_IDS[pos]], FinishReason.LENGTH))
            else:
                self.running[rid] = (req, pos + 1, made)
                outs.append(EngineOutput(rid, [SCRIPT_IDS[pos]]))
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=0, tokens_in_flight=0)


def fake_controller(calls: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/register_worker")
    async def register(body: dict[str, Any]) -> dict[str, Any]:
        calls.append("register")
        return {"address": body["worker_name"], "status": body["worker_status"], "last_heartbeat": 0.0}

    @app.post("/receive_heart_beat")
    async def heartbeat() -> dict[str, bool]:
        calls.append("heartbeat")
        return {"exist": True}

    @app.post("/unregister_worker")
    async def unregister() -> dict[str, bool]:
        calls.append("unregister")
        return {"removed": True}

    return app


@pytest.fixture
async def make_worker():
    async with contextlib.AsyncExitStack() as stack:

        async def make(engine: Any, http: httpx.AsyncClient | None = None, **settings: Any) -> httpx.AsyncClient:
            settings.setdefault("controller_addresses", [])
            s = WorkerSettings(model_path="fake", worker_address="http://worker", **settings)
            drain = Drain(s.drain_timeout_s)
            app = create_app(s, load=lambda _s: loaded(engine, "test"), drain=drain, http_client=http)
            asgi, _ = await stack.enter_async_context(running(app))
            client = httpx.AsyncClient(transport=StreamingASGITransport(asgi), base_url="http://worker")
            await stack.enter_async_context(client)
            client.drain = drain  # type: ignore[attr-defined]
            return client

        yield make


async def generate(client: httpx.AsyncClient, **body: Any) -> tuple[int, list[dict]]:
    body.setdefault("request_id", "r1")
    async with client.stream("POST", "/worker/generate", json=body) as resp:
        return resp.status_code, [json.loads(line) async for line in resp.aiter_lines() if line]


def text_of(chunks: list[dict]) -> str:
    return "".join(c["text"] for c in chunks)


# ---------------------------------------------------------------------------------------------------------------
# The text layer


@pytest.mark.parametrize("stops", [[], ["wörld"], ["🙂 ag"], ["nowhere"]])
def test_resumed_text_stream_continues_exactly_where_the_delivered_text_stops(stops: list[str]) -> None:
    tok = ByteTokenizer()
    whole = TextStream(tok, PROMPT, stops)
    pieces = [whole.push([i]) for i in SCRIPT_IDS] + [whole.finish()]
    full = "".join(pieces)
    for k in range(len(SCRIPT_IDS) + 1):  # a replica died after sending k ids
        if whole_stopped_before(tok, stops, k):
            continue
        delivered = "".join(pieces[:k])
        resumed = TextStream(tok, PROMPT, stops)
        out = resumed.resume(SCRIPT_IDS[:k], len(delivered))
        out += "".join(resumed.push([i]) for i in SCRIPT_IDS[k:]) + resumed.finish()
        assert delivered + out == full, k


def whole_stopped_before(tok: ByteTokenizer, stops: list[str], k: int) -> bool:
    """True when an undisturbed stream has stopped within its first k ids (nothing left to resume)."""
    ts = TextStream(tok, PROMPT, stops)
    for i in SCRIPT_IDS[:k]:
        ts.push([i])
        if ts.stopped:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# The worker


async def test_the_first_chunk_carries_the_prompt_token_ids(make_worker) -> None:
    client = await make_worker(ContinuingEngine(prompt_len=len("user: hi\nassistant:")))
    status, chunks = await generate(client, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert status == 200
    assert chunks[0]["prompt_token_ids"] == list(b"user: hi\nassistant:")
    assert all(c["prompt_token_ids"] is None for c in chunks[1:])
    assert text_of(chunks) == "Hello"


@pytest.mark.parametrize(
    ("cut", "stop"),
    [
        (len(b"Hello w") + 1, []),  # inside ö: its first byte went out, its text did not
        (len("Hello wörld ".encode()) + 2, []),  # inside the emoji
        (len(b"Hello w"), ["wörld"]),  # inside a possible stop string
        (0, []),  # before anything
    ],
)
async def test_a_resumed_generation_sends_exactly_the_text_not_yet_delivered(make_worker, cut, stop) -> None:
    client = await make_worker(ContinuingEngine())
    max_tokens = len(SCRIPT_IDS)
    _, whole = await generate(client, prompt="x", max_tokens=max_tokens, stop=stop)
    delivered = TextStream(ByteTokenizer(), PROMPT, stop).push(SCRIPT_IDS[:cut])
    status, chunks = await generate(
        client,
        request_id="r2",
        prompt_token_ids=PROMPT,
        resume_token_ids=SCRIPT_IDS[:cut],
        resume_text_chars=len(delivered),
        max_tokens=max_tokens,
        stop=stop,
    )
    assert status == 200
    assert delivered + text_of(chunks) == text_of(whole)
    assert chunks[-1]["finish_reason"] == whole[-1]["finish_reason"]
    if not stop:  # (a stop string ends the stream where the engine happens to be: its token count varies)
        assert chunks[-1]["completion_tokens"] == whole[-1]["completion_tokens"] == max_tokens  # each id once
        assert sum((c["token_ids"] for c in chunks), []) == SCRIPT_IDS[cut:]


async def test_resumed_ids_that_already_end_in_a_stop_string_stop_at_once(make_worker) -> None:
    client = await make_worker(ContinuingEngine())
    done = list("Hello wörld".encode())
    status, chunks = await generate(
        client, prompt_token_ids=PROMPT, resume_token_ids=done, resume_text_chars=len("Hello "), stop=["wörld"]
    )
    assert status == 200 and text_of(chunks) == "" and chunks[-1]["finish_reason"] == "stop"


async def test_resume_ids_outside_the_vocabulary_are_a_400(make_worker) -> None:
    client = await make_worker(ContinuingEngine())
    resp = await client.post(
        "/worker/generate", json={"request_id": "r", "prompt": "x", "resume_token_ids": [1, 10**6]}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "resume_token_ids"


async def test_drain_leaves_the_controllers_refuses_new_requests_and_waits_for_open_streams(make_worker) -> None:
    calls: list[str] = []
    engine = PausingEngine(pause_at=3)
    http = httpx.AsyncClient(transport=StreamingASGITransport(fake_controller(calls)))
    client = await make_worker(engine, controller_addresses=["http://controller"], http=http)
    try:
        while "register" not in calls:
            await asyncio.sleep(0.01)
        assert (await client.get("/ready")).status_code == 200

        async def one_stream() -> list[dict]:
            return (await generate(client, prompt="x", max_tokens=10, ignore_eos=True))[1]

        in_progress = asyncio.create_task(one_stream())
        while not engine.running:
            await asyncio.sleep(0.01)
        drain = asyncio.create_task(client.drain.drain())
        while "unregister" not in calls:
            await asyncio.sleep(0.01)
        refused = await client.post("/worker/generate", json={"request_id": "r2", "prompt": "x"})
        assert refused.status_code == 503 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 200
        assert not drain.done()

        engine.release.set()
        chunks = await in_progress
        assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["completion_tokens"] == 10
        assert await drain is True
        assert calls.count("unregister") == 1
        heartbeats = calls.count("heartbeat")
        await asyncio.sleep(0.05)
        assert calls.count("heartbeat") == heartbeats  # no heartbeat after leaving
    finally:
        engine.release.set()
        await http.aclose()


async def test_drain_gives_up_after_its_timeout(make_worker) -> None:
    engine = PausingEngine(pause_at=3)
    client = await make_worker(engine, drain_timeout_s=0.2)
    try:
        in_progress = asyncio.create_task(generate(client, prompt="x", max_tokens=10, ignore_eos=True))
        while not engine.running:
            await asyncio.sleep(0.01)
        drain = client.drain
        assert await drain.drain(0.2) is False
        assert drain.in_progress == 1
    finally:
        engine.release.set()
    await in_progress
    assert drain.in_progress == 0
