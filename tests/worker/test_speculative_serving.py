"""A worker serving the real SmolLM2 GGUF with n-gram speculative decoding (`--spec-type ngram`): a stop string that
lands inside a run of accepted drafts still cuts the text there, and /metrics reports the drafted and accepted
tokens."""

from __future__ import annotations

import httpx
import pytest

from lmfleet.worker.app import WorkerSettings, create_app
from tests.api.fakes import StreamingASGITransport
from tests.fakes import running
from tests.scrape import scrape
from tests.worker.test_worker_app import generate

pytest.importorskip("llama_cpp")

CODE = "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n\ndef sub(a, b):\n    return a - b\n"


async def test_a_stop_string_on_speculated_tokens_and_the_acceptance_counters(smollm2_gguf) -> None:
    from lmfleet.engine.llamacpp import LlamaCppSettings

    # no prefix cache: the second answer is computed as the first (reused cells can flip a near-tie)
    # and verifying taken as free, so the requests draft whatever this machine's timings
    engine = LlamaCppSettings(
        max_model_len=1024, n_threads=1, prefix_cache=False, spec_type="ngram", spec_verify_cost=0.0
    )
    settings = WorkerSettings(
        model_path=str(smollm2_gguf), worker_address="http://w", controller_addresses=[], engine_settings=engine
    )
    messages = [{"role": "user", "content": f"Repeat this code exactly:\n\n{CODE}"}]
    async with running(create_app(settings)) as (asgi, _):
        async with httpx.AsyncClient(transport=StreamingASGITransport(asgi), base_url="http://w") as client:
            status, chunks = await generate(client, messages=messages, temperature=0.0, max_tokens=80)
            assert status == 200
            whole = "".join(c["text"] for c in chunks)
            assert "def mul" in whole and "def sub" in whole, whole  # the answer repeats the code
            status, chunks = await generate(client, messages=messages, temperature=0.0, max_tokens=80, stop=["sub"])
            assert status == 200
            assert "".join(c["text"] for c in chunks) == whole[: whole.index("sub")]
            assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["stop_string"] == "sub"
            metrics = await scrape(client)
    model = {"model": str(smollm2_gguf)}
    drafted = metrics.value("lmfleet_worker_spec_draft_tokens_total", **model)
    accepted = metrics.value("lmfleet_worker_spec_accepted_tokens_total", **model)
    assert drafted > 0 and 0 < accepted <= drafted
