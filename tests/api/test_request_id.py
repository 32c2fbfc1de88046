"""X-Request-ID: the client's id (sanitized, bounded) or a new one comes back on every answer, errors and refusals
included, and goes on to the worker with the generation."""

from __future__ import annotations

import re

import httpx
import pytest

from lmfleet.requestid import HEADER, MAX_LENGTH
from lmfleet.worker.app import WorkerSettings
from lmfleet.worker.app import create_app as create_worker
from tests.fakes import ScriptedEngine, loaded, running

from .fakes import Fleet, serve

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}
KEY = "sk-request-id-test"


class Recording(Fleet):
    """Records the X-Request-ID of every request the API server makes to a worker."""

    def http_client(self) -> httpx.AsyncClient:
        client = super().http_client()
        self.sent: list[str | None] = []

        async def record(request: httpx.Request) -> None:
            if request.url.path == "/worker/generate":
                self.sent.append(request.headers.get(HEADER))

        client.event_hooks["request"].append(record)
        return client


@pytest.mark.parametrize("stream", [False, True])
async def test_the_clients_id_comes_back_and_goes_on_to_the_worker(stream: bool) -> None:
    fleet = Recording()
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers={HEADER: "req-42"})
        assert resp.status_code == 200 and resp.headers[HEADER] == "req-42"
        again = await api.raw.post("/v1/chat/completions", json=CHAT)
    made = again.headers[HEADER]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert fleet.sent == ["req-42", made]


async def test_errors_and_refusals_carry_an_id_too() -> None:
    async with serve(api_keys=[KEY]) as api:
        refused = await api.raw.get("/v1/models", headers={HEADER: "no-key"})
        assert refused.status_code == 401 and refused.headers[HEADER] == "no-key"
        auth = {"Authorization": f"Bearer {KEY}"}
        missing = await api.raw.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth)
        assert missing.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", missing.headers[HEADER])
        bad = await api.raw.post("/v1/chat/completions", content=b"{not json", headers={**auth, HEADER: "bad-json"})
        assert bad.status_code == 400 and bad.headers[HEADER] == "bad-json"
        api.drain.draining = True
        draining = await api.raw.get("/v1/models", headers={**auth, HEADER: "late"})
        assert draining.status_code == 503 and draining.headers[HEADER] == "late"


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc def;\tX-Evil: 1", "abcdefX-Evil:1"),  # nothing that could split a log line or a header
        ('"quoted" <id> {json}', "quotedidjson"),
        ("x" * 500, "x" * MAX_LENGTH),
        ("ok.id:part-7_8", "ok.id:part-7_8"),
    ],
)
async def test_a_clients_id_is_sanitized_and_bounded(given: str, kept: str) -> None:
    async with serve() as api:
        resp = await api.raw.get("/health", headers={HEADER: given})
    assert resp.headers[HEADER] == kept


async def test_an_id_with_nothing_safe_in_it_is_replaced() -> None:
    async with serve() as api:
        resp = await api.raw.get("/health", headers={HEADER: "<>!?"})
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers[HEADER])


async def test_the_worker_answers_with_the_id_it_was_given() -> None:
    settings = WorkerSettings(model_path="m", worker_address="http://w", controller_addresses=[])
    async with running(create_worker(settings, load=lambda _s: loaded(ScriptedEngine("hi")))) as (asgi, _):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://w") as client:
            body = {"request_id": "r1", "prompt": "x"}
            resp = await client.post("/worker/generate", json=body, headers={HEADER: "from-api-1"})
            assert resp.status_code == 200 and resp.headers[HEADER] == "from-api-1"
            assert (await client.post("/worker/generate", json={})).headers[HEADER]  # a 400 too
