"""The worker parses its own input too (it can be reached without the API server in front): values that would
overflow a tensor or a generator seed, or make stop matching slow, are a 400 naming the field, and the worker
keeps serving."""

from __future__ import annotations

import json

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
