"""Observability of a real fleet (controller, a llama.cpp worker on SmolLM2, API server; real processes, JSON logs):
each process's /metrics scraped over plain HTTP after real traffic and parsed as Prometheus parses it, the API
key in front of the API server's, one X-Request-ID from the client's answer to the worker's log, every log line a
JSON object, and the worker's one line saying what it loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Fleet, free_port, wait_until
from tests.scrape import parse

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

KEY = "sk-observability-3b8e"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUEST_ID = "e2e-req-7f3a"
PROMPT = "Name one colour of the rainbow, pangolin-marker."
JSON_LOGS = ("--log-format", "json")


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("observability")) as f:
        f.controller(*JSON_LOGS)
        f.worker_port = free_port()
        flags = ("--model-names", "smollm2", "--threads", "1", "--max-model-len", "1024", *JSON_LOGS)
        f.worker("worker", smollm2_gguf, *flags, port=f.worker_port)
        f.env = {"LMFLEET_API_KEYS": KEY}
        f.api(*JSON_LOGS)
        f.wait_models(1, headers=AUTH)
        yield f


def get(url: str, **kw) -> httpx.Response:
    return httpx.get(url, timeout=10, **kw)


def json_lines(log: Path) -> list[dict]:
    """Every line of a process's log, each parsed as JSON (a line that is not JSON fails the test)."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]


def test_metrics_request_ids_and_json_logs(fleet: Fleet) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
    first = httpx.post(fleet.api_url + "/v1/chat/completions", json=body, headers={**AUTH, "X-Request-ID": REQUEST_ID})
    assert first.status_code == 200, first.text
    assert first.headers["x-request-id"] == REQUEST_ID
    client = openai.OpenAI(base_url=fleet.api_url + "/v1", api_key=KEY, max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=body["messages"],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usages = [first.json()["usage"], chunks[-1].usage.model_dump()]

    # the API server: behind the key; requests, tokens and first-token latency of both answers
    assert get(fleet.api_url + "/metrics").status_code == 401
    api = parse(get(fleet.api_url + "/metrics", headers=AUTH).text)
    chat = {"route": "/v1/chat/completions", "method": "POST", "model": "smollm2"}
    assert api.value("lmfleet_api_requests_total", **chat, status="200") == 2
    assert api.value("lmfleet_api_prompt_tokens_total", model="smollm2") == sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert api.value("lmfleet_api_completion_tokens_total", model="smollm2") == completion
    assert api.value("lmfleet_api_time_to_first_token_seconds_count", model="smollm2") == 2
    assert api.value("lmfleet_api_inter_token_latency_seconds_count", model="smollm2") > 0
    assert api.value("lmfleet_api_workers", state="healthy") == 1

    # the worker: the engine's work, and what a GIE endpoint picker reads
    worker = parse(get(f"http://127.0.0.1:{fleet.worker_port}/metrics").text)
    generate = {"route": "/worker/generate", "method": "POST", "status": "200"}
    assert worker.value("lmfleet_worker_requests_total", **generate) == 2
    assert worker.value("lmfleet_worker_prefill_tokens_total", model="smollm2") > 0
    assert worker.value("lmfleet_worker_decode_tokens_total", model="smollm2") >= completion - 2
    assert worker.value("lmfleet_worker_step_seconds_count", model="smollm2") >= completion
    assert worker.value("lmfleet_worker_model_load_seconds", model="smollm2", engine="llamacpp") > 0
    assert worker.labels("vllm:cache_config_info") == [{"block_size": "1", "num_gpu_blocks": "1024"}]
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert worker.types[name] == "gauge" and worker.labels(name) == [{"model_name": "smollm2"}]
    status = get(f"http://127.0.0.1:{fleet.worker_port}/worker/status").json()
    assert 0 <= status["kv_cache_usage"] <= 1

    # the controller: the fleet
    controller = parse(get(fleet.controller_url + "/metrics").text)
    assert controller.value("lmfleet_controller_workers", model="smollm2") == 1
    assert controller.value("lmfleet_controller_worker_events_total", event="registered") >= 1

    for text in (api.text, worker.text, controller.text):
        assert KEY not in text and "pangolin" not in text

    # the logs: JSON lines; one request id from the API server's log to the worker's
    def logs(name: str) -> list[dict]:
        return json_lines(fleet.procs[name].log)

    wait_until(
        lambda: any(r.get("request_id") == REQUEST_ID for r in logs("worker")),
        timeout=10,
        what="the worker's log line about the request",
    )
    api_lines = [r for r in logs("api") if r.get("request_id") == REQUEST_ID]
    assert any("/v1/chat/completions" in r["message"] for r in api_lines)
    worker_lines = [r for r in logs("worker") if r.get("request_id") == REQUEST_ID]
    assert any("/worker/generate" in r["message"] for r in worker_lines)
    assert all({"asctime", "level", "name", "message"} <= set(r) for r in logs("controller"))
    loaded = [r["message"] for r in logs("worker") if r["message"].startswith("loaded ")]
    assert len(loaded) == 1
    for part in ("engine=llamacpp", "Q4_1", "device=", "context=1024", "parameters=", "peak RSS"):
        assert part in loaded[0]
    for name in ("api", "worker", "controller"):
        assert KEY not in fleet.procs[name].log.read_text()
