"""The worker parses its own input too (it can be reached without the API server in front): values that would
overflow a tensor or a generator seed, or make stop matching slow, are a 400 naming the field, and the worker
keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.api.fakes import assert_error
from tests.security.test_guard import started_worker


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": ["s"] * 65}, "stop"),
        ({"stop": ["s" * 4097]}, "stop.0"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids.0"),
        ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
        ({"temperature": "NaN"}, "temperature"),  # sent as the bare JSON token NaN below
        ({"max_tokens": 0}, "max_tokens"),
        ({"request_id": ""}, "request_id"),
    ],
)
async def test_worker_refuses_values_that_would_break_the_engine(patch: dict, param: str) -> None:
    body = json.dumps({"request_id": "r", "prompt": "hi", **patch}).replace('"NaN"', "NaN")
    async with started_worker(max_request_bytes=1 << 20) as worker:
        resp = await worker.post("/worker/generate", content=body, headers={"content-type": "application/json"})
        assert_error(resp, 400, param=param)
        ok = await worker.post("/worker/generate", json={"request_id": "ok", "prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200


async def test_worker_context_check_names_max_tokens() -> None:
    async with started_worker() as worker:
        resp = await worker.post("/worker/generate", json={"request_id": "r", "prompt": "hi", "max_tokens": 10**9})
        assert_error(resp, 400, param="max_tokens", code="context_length_exceeded")


async def test_embedding_scoring_and_tokenizer_routes_need_the_fleet_secret() -> None:
    from lmfleet.worker.app import WorkerSettings
    from lmfleet.worker.app import create_app as create_worker
    from tests.fakes import ScriptedEngine, loaded, running

    settings = WorkerSettings(
        model_path="fake", worker_address="http://worker", controller_addresses=[], registration_secret="s3cret"
    )
    app = create_worker(settings, load=lambda _s: loaded(ScriptedEngine()))
    bodies = {
        "/worker/embed": {"request_id": "e", "input": ["hi"]},
        "/worker/score": {"request_id": "s", "text_1": ["hi"], "text_2": ["there"]},
        "/worker/tokenize": {"prompt": "hi"},
        "/worker/detokenize": {"tokens": [104, 105]},
    }
    async with (
        running(app) as (asgi, _),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://worker") as worker,
    ):
        for path, body in bodies.items():
            assert_error(await worker.post(path, json=body), 401)
            assert_error(await worker.post(path, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        secret = {"Authorization": "Bearer s3cret"}
        assert (await worker.post("/worker/tokenize", json=bodies["/worker/tokenize"], headers=secret)).json() == {
            "tokens": [104, 105],
            "max_model_len": 256,
        }
        back = await worker.post("/worker/detokenize", json=bodies["/worker/detokenize"], headers=secret)
        assert back.json() == {"prompt": "hi"}
        for path in ("/worker/embed", "/worker/score"):  # past the secret: a generation model does neither
            assert_error(await worker.post(path, json=bodies[path], headers=secret), 400, param="model")
