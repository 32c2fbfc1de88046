"""The API server's /metrics after real traffic through it (fake workers): requests by route, model and status,
tokens as usage counts them, first-token and inter-token latency, retries, resumes, ejections and 429s; the key
gate in front of it; nothing a client sent (prompt, unknown model name, key, path) in a label; and the same
request figures as the dashboard's (one timer, two sinks)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from lmfleet.api.fleet import FleetView
from lmfleet.protocol.errors import ErrorResponse
from tests.scrape import scrape

from .fakes import Api, Fleet, assert_error, serve

PROMPT = "zebra quokka narwhal axolotl"
MESSAGES = [{"role": "user", "content": PROMPT}]
CHAT = "/v1/chat/completions"
KEY = "sk-metrics-key-9f2c"
AUTH = {"Authorization": f"Bearer {KEY}"}


def two_workers(first: str = "a") -> Fleet:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.controller.load[fleet.workers["b" if first == "a" else "a"].address] = 1
    return fleet


async def test_requests_tokens_and_latencies_are_counted_by_route_model_and_status() -> None:
    async with serve() as api:
        plain = await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        stream = await api.openai.chat.completions.create(
            model="echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        usage = [c async for c in stream][-1].usage
        assert usage is not None and plain.usage is not None
        assert (await api.raw.post(CHAT, json={"model": "no-such-model-7c1", "messages": MESSAGES})).status_code == 404
        assert (await api.raw.get("/no/such/path-5e3")).status_code == 404
        m = await scrape(api.raw)

    assert m.types["lmfleet_api_requests"] == "counter"
    assert m.types["lmfleet_api_time_to_first_token_seconds"] == "histogram"
    requests = "lmfleet_api_requests_total"
    assert m.value(requests, route=CHAT, method="POST", model="echo", status="200") == 2
    assert m.value(requests, route=CHAT, method="POST", model="", status="404") == 1  # unknown model: no label
    assert m.value(requests, route="other", method="GET", status="404") == 1  # unknown path: collapsed
    assert m.value("lmfleet_api_request_duration_seconds_count", route=CHAT, model="echo") == 2
    assert m.value("lmfleet_api_prompt_tokens_total", model="echo") == plain.usage.prompt_tokens + usage.prompt_tokens
    completion = plain.usage.completion_tokens + usage.completion_tokens
    assert m.value("lmfleet_api_completion_tokens_total", model="echo") == completion
    assert m.value("lmfleet_api_time_to_first_token_seconds_count", model="echo") == 2  # one per choice
    # the fake sends one token per chunk: every token after the first observes one gap
    assert m.value("lmfleet_api_inter_token_latency_seconds_count", model="echo") == completion - 2
    assert m.value("lmfleet_api_workers", state="healthy") == 1
    assert m.value("lmfleet_api_controller_up") == 1
    for secret in ["zebra", "no-such-model-7c1", "path-5e3", "sk-test"]:
        assert secret not in m.text


async def test_a_failed_worker_counts_as_a_retry_and_an_ejection() -> None:
    fleet = two_workers("a")
    fleet.workers["a"].reject = (500, {"error": {"message": "boom", "type": "internal_error"}})
    async with serve(fleet) as api:
        await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        m = await scrape(api.raw)
    assert m.value("lmfleet_api_retries_total", model="echo", reason="worker_error") == 1
    assert m.value("lmfleet_api_worker_ejections_total") == 1
    assert m.value("lmfleet_api_workers", state="ejected") == 1
    assert m.value("lmfleet_api_requests_total", route=CHAT, status="200") == 1


async def test_full_workers_are_retries_then_one_429() -> None:
    fleet = two_workers("a")
    full = (429, {"error": {"message": "server is at capacity", "type": "rate_limit_error"}})
    fleet.all_workers(reject=full)
    async with serve(fleet) as api:
        assert_error(await api.raw.post(CHAT, json={"model": "echo", "messages": MESSAGES}), 429)
        m = await scrape(api.raw)
    assert m.value("lmfleet_api_requests_total", route=CHAT, model="echo", status="429") == 1
    assert m.value("lmfleet_api_retries_total", model="echo", reason="queue_full") == 1  # a, then b
    assert m.value("lmfleet_api_worker_ejections_total") == 0  # a full worker is healthy


async def test_a_stream_resumed_elsewhere_counts_one_resume() -> None:
    fleet = two_workers("a")
    fleet.workers["a"].then, fleet.workers["a"].after = "break", 3
    async with serve(fleet) as api:
        stream = await api.openai.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        m = await scrape(api.raw)
    assert m.value("lmfleet_api_resumes_total", model="echo") == 1
    assert m.value("lmfleet_api_worker_ejections_total") == 1
    assert m.value("lmfleet_api_time_to_first_token_seconds_count", model="echo") == 1  # still one choice


@pytest.mark.parametrize("public", [False, True])
async def test_metrics_needs_the_api_key_unless_made_public(public: bool) -> None:
    async with serve(api_keys=[KEY], api_key=KEY, metrics_public=public) as api:
        await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        anonymous = await api.raw.get("/metrics")
        if public:
            assert anonymous.status_code == 200
        else:
            ErrorResponse.model_validate(assert_error(anonymous, 401, code="invalid_api_key") and anonymous.json())
        assert_error(await api.raw.get("/v1/models"), 401)  # the rest stays closed either way
        m = await scrape(api.raw, headers=AUTH)
    assert m.value("lmfleet_api_requests_total", route="/metrics", status="401") == (0 if public else 1)
    assert KEY not in m.text and "zebra" not in m.text


async def hang_up_mid_upload(api: Api, path: str) -> list[Message]:
    """Send half a body, then disconnect; what the app sent back."""
    incoming: list[Message] = [
        {"type": "http.request", "body": b'{"model": "echo", "messages": [{"role": "us', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if len(incoming) > 1 else incoming[0]

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"api.test"), (b"content-type", b"application/json"), (b"content-length", b"200")],
        "client": ("127.0.0.1", 50000),
        "server": ("api.test", 80),
    }
    await api.asgi(scope, receive, send)
    return sent


async def test_metrics_and_the_dashboard_record_each_request_alike() -> None:
    """One timer, two sinks: an answer, an error and a client that hung up mid-upload count the same in /metrics
    and in the dashboard's figures (/v1/fleet)."""
    async with serve() as api:
        await api.openai.chat.completions.create(model="echo", messages=MESSAGES)
        assert (await api.raw.post(CHAT, json={"model": "no-such-model", "messages": MESSAGES})).status_code == 404
        assert await hang_up_mid_upload(api, CHAT) == []  # nobody to answer
        m = await scrape(api.raw)
        await asyncio.sleep(1.1)  # the dashboard's history holds complete seconds only
        view = FleetView.model_validate((await api.raw.get("/v1/fleet")).json())

    by_status = {s["status"]: v for s, v in m.samples["lmfleet_api_requests_total"] if s["route"] == CHAT}
    assert by_status == {"200": 1, "404": 1, "499": 1}  # the hang-up is the client's 499, not a server error
    assert m.value("lmfleet_api_request_duration_seconds_count", route=CHAT) == 3
    requests, step = view.requests, view.step_s
    assert round(sum(requests.per_s_history) * step) == sum(by_status.values())
    assert round(sum(requests.errors_per_s_history) * step) == by_status["404"] + by_status["499"]
    assert requests.in_progress == 0
    assert [v for v in requests.latency_p50_s_history if v is not None]  # the answer's latency, the only sample
