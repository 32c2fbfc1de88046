"""The worker's /metrics over a scripted engine: requests, engine steps, tokens, the KV cache, and the names the
Gateway API Inference Extension's endpoint picker reads (vLLM's); `/worker/status` reports the KV cache use."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx

from lmfleet.engine.base import EngineOutput, EngineRequest, EngineStats
from lmfleet.worker.app import WorkerSettings, create_app
from tests.api.fakes import StreamingASGITransport
from tests.fakes import KV_BYTES_PER_TOKEN, ScriptedEngine, loaded, running
from tests.scrape import scrape
from tests.worker.test_worker_app import settles

CAPACITY = 1000


class CountingEngine(ScriptedEngine):
    """Counts prefill and decode tokens and reports a KV capacity, as the real engines do."""

    prefilled = decoded = 0

    def add_request(self, request: EngineRequest) -> None:
        super().add_request(request)
        self.prefilled += len(request.prompt_token_ids)

    def step(self) -> list[EngineOutput]:
        outs = super().step()
        self.decoded += sum(len(o.new_token_ids) for o in outs)
        return outs

    def stats(self) -> EngineStats:
        return dataclasses.replace(
            super().stats(),
            kv_capacity=CAPACITY,
            prefill_tokens=self.prefilled,
            decode_tokens=self.decoded,
            spec_draft_tokens=3 * self.steps,  # as a speculating engine would count them
            spec_accepted_tokens=2 * self.steps,
        )


async def test_requests_steps_tokens_and_the_kv_cache_are_exposed() -> None:
    engine = CountingEngine("abcdefgh", step_s=0.01)
    settings = WorkerSettings(model_path="/models/fake.gguf", worker_address="http://w", controller_addresses=[])
    async with running(create_app(settings, load=lambda _s: loaded(engine))) as (asgi, _):
        async with httpx.AsyncClient(transport=StreamingASGITransport(asgi), base_url="http://w") as client:
            for i in range(2):
                body = {"request_id": f"r{i}", "prompt": "secret-prompt-17", "max_tokens": 5}
                resp = await client.post("/worker/generate", json=body)
                assert resp.status_code == 200
            assert (await client.post("/worker/generate", json={"request_id": "e", "prompt": ""})).status_code == 400

            body = {"request_id": "long", "prompt": "hi", "max_tokens": 200, "ignore_eos": True}
            async with client.stream("POST", "/worker/generate", json=body) as stream:
                lines = stream.aiter_lines()
                for _ in range(2):  # the second chunk comes after the snapshot of the step that made the first
                    assert json.loads(await anext(lines))["token_ids"]
                status = (await client.get("/worker/status")).json()
                live = await scrape(client)
            assert await settles(lambda: engine.aborted and not engine.running)  # the stream closed: aborted
            while (await client.get("/worker/status")).json()["queue_length"]:
                await asyncio.sleep(0.01)
            idle = await scrape(client)

    model = {"model": "/models/fake.gguf"}
    assert 0 < status["kv_cache_usage"] <= 1
    assert live.value("vllm:num_requests_running", model_name="/models/fake.gguf") == 1
    assert live.value("vllm:num_requests_waiting", model_name="/models/fake.gguf") == 0
    assert 0 < live.value("vllm:kv_cache_usage_perc", model_name="/models/fake.gguf") <= 1
    assert live.value("lmfleet_worker_kv_cache_usage_ratio", **model) == live.value("vllm:kv_cache_usage_perc")
    assert live.value("lmfleet_worker_kv_cache_tokens", **model) > 2
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert live.types[name] == "gauge"
    assert live.labels("vllm:cache_config_info") == [{"block_size": "1", "num_gpu_blocks": str(CAPACITY)}]
    assert live.labels("vllm:lora_requests_info") == [
        {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    ]

    m = idle
    generate = {"route": "/worker/generate", "method": "POST"}
    assert m.value("lmfleet_worker_requests_total", **generate, status="200") == 3
    assert m.value("lmfleet_worker_requests_total", **generate, status="400") == 1
    assert m.value("vllm:num_requests_running") == 0 and m.value("vllm:kv_cache_usage_perc") == 0
    assert m.value("lmfleet_worker_prefill_tokens_total", **model) == engine.prefilled == 2 * 16 + 2
    assert m.value("lmfleet_worker_decode_tokens_total", **model) == engine.decoded
    assert m.value("lmfleet_worker_step_seconds_count", **model) == engine.steps
    assert m.value("lmfleet_worker_spec_draft_tokens_total", **model) == 3 * engine.steps
    assert m.value("lmfleet_worker_spec_accepted_tokens_total", **model) == 2 * engine.steps
    assert m.value("lmfleet_worker_step_decode_tokens_sum", **model) == engine.decoded
    assert m.value("lmfleet_worker_step_prefill_tokens_sum", **model) == engine.prefilled
    assert m.value("lmfleet_worker_batch_size_count", **model) == engine.steps
    assert m.labels("lmfleet_worker_model_load_seconds") == [{"model": "/models/fake.gguf", "engine": "scripted"}]
    assert "secret-prompt" not in m.text


async def test_the_prefix_cache_is_reported_on_first_chunks_in_metrics_and_in_the_status() -> None:
    """The engine's cached tokens ride on each request's first chunk (0 when nothing was cached); its look-ups and
    hits are counters, its bytes per tier gauges, and the status carries the hit rate."""
    engine = ScriptedEngine("abcdefgh", prefix_cache=True)
    settings = WorkerSettings(model_path="/models/fake.gguf", worker_address="http://w", controller_addresses=[])
    prompt = "the same prompt, twice"
    async with running(create_app(settings, load=lambda _s: loaded(engine))) as (asgi, _):
        async with httpx.AsyncClient(transport=StreamingASGITransport(asgi), base_url="http://w") as client:
            assert (await client.get("/worker/status")).json()["prefix_cache_hit_rate"] is None  # no look-ups yet
            firsts = []
            for i in range(2):
                body = {"request_id": f"r{i}", "prompt": prompt, "max_tokens": 5}
                resp = await client.post("/worker/generate", json=body)
                chunks = [json.loads(line) for line in resp.text.splitlines()]
                assert all(c["cached_tokens"] == 0 for c in chunks[1:])  # on the first chunk only
                firsts.append(chunks[0]["cached_tokens"])
            status = (await client.get("/worker/status")).json()
            m = await scrape(client)

    n = len(prompt)  # one token per byte
    assert firsts == [0, n - 1]  # the second found all but the last prompt token cached (it is always computed)
    model = {"model": "/models/fake.gguf"}
    assert m.value("lmfleet_worker_prefix_cache_queries_total", **model) == 2 * n
    assert m.value("lmfleet_worker_prefix_cache_hits_total", **model) == n - 1
    assert m.types["lmfleet_worker_prefix_cache_queries"] == m.types["lmfleet_worker_prefix_cache_hits"] == "counter"
    assert m.value("lmfleet_worker_prefix_cache_bytes", **model, tier="kv") == KV_BYTES_PER_TOKEN * 2 * n
    assert m.value("lmfleet_worker_prefix_cache_bytes", **model, tier="host") == 0
    assert m.types["lmfleet_worker_prefix_cache_bytes"] == "gauge"
    assert status["prefix_cache_hit_rate"] == (n - 1) / (2 * n)
