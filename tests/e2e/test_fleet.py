"""End to end: a real controller, two real workers (two tiny models) and a real API server on loopback,
driven with the official `openai` client and plain HTTP — what a user of the quickstart does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Fleet, free_port, wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Fleet(root=tmp_path_factory.mktemp("fleet")) as f:
        f.controller()
        f.alpha_port = free_port()
        f.worker("worker-alpha", tiny_models["alpha"], "--model-names", "alpha", port=f.alpha_port)
        f.worker("worker-beta", tiny_models["beta"], "--model-names", "beta")
        f.api("--default-model", "alpha")
        f.wait_models(2)
        yield f


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.api_url + "/v1", api_key="none", max_retries=0)


def chat(client: openai.OpenAI, content: str = "Tell me a story.", **kw):
    kw.setdefault("model", "alpha")
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def test_models_lists_both_models(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == ["alpha", "beta"]


def test_chat_completion_shape_and_usage(client: openai.OpenAI) -> None:
    reply = chat(client, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "alpha" and reply.id
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_each_model_answers_from_its_own_worker(client: openai.OpenAI) -> None:
    a = chat(client, model="alpha", temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    b = chat(client, model="beta", temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    assert a.model == "alpha" and b.model == "beta"
    assert a.choices[0].message.content != b.choices[0].message.content  # different random weights


def test_streamed_text_equals_non_streamed_text_under_greedy(client: openai.OpenAI) -> None:
    body = dict(temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    whole = chat(client, "Stream or not?", **body).choices[0].message.content
    chunks = list(chat(client, "Stream or not?", stream=True, stream_options={"include_usage": True}, **body))
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole and whole
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_completions_stream_and_non_stream(client: openai.OpenAI) -> None:
    body = dict(model="beta", prompt="Once upon a time", temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    whole = client.completions.create(**body)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **body) if c.choices)
    assert streamed == whole.choices[0].text


def test_same_seed_same_text_and_other_seed_other_text(client: openai.OpenAI) -> None:
    body = dict(temperature=1.0, max_tokens=30, extra_body={"ignore_eos": True})
    first = chat(client, "Surprise me.", seed=1234, **body).choices[0].message.content
    again = chat(client, "Surprise me.", seed=1234, **body).choices[0].message.content
    other = chat(client, "Surprise me.", seed=4321, **body).choices[0].message.content
    assert first == again
    assert first != other


def test_stop_string_cuts_the_output(client: openai.OpenAI) -> None:
    body = dict(temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    full = chat(client, "Where do we stop?", **body).choices[0].message.content
    stop = full[10:13]
    assert stop.strip(), full
    cut = chat(client, "Where do we stop?", stop=[stop], **body)
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(client, "Where do we stop?", stop=[stop], stream=True, **body)
        if c.choices
    )
    assert streamed == full[: full.index(stop)]


def test_n_two_gives_two_choices(client: openai.OpenAI) -> None:
    reply = chat(client, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    seen = {c.choices[0].index for c in chat(client, n=2, stream=True, max_tokens=8) if c.choices}
    assert seen == {0, 1}


def test_fastchat_users_request_json_posted_to_root(fleet: Fleet) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is deep learning?"},
        ],
        "max_tokens": 100,
    }
    r = httpx.post(fleet.api_url + "/", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "alpha"
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(data)
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_errors_are_openai_shaped(fleet: Fleet, client: openai.OpenAI) -> None:
    url = fleet.api_url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    error_of(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert error_of(httpx.post(url, json={"model": "alpha", "messages": "hi"}), 400)["param"]
    assert error_of(httpx.post(url, json={"model": "alpha", "messages": msgs, "temperature": "hot"}), 400)["param"]
    assert error_of(httpx.post(url, json={"model": "nope", "messages": msgs}), 404)["code"] == "model_not_found"
    too_long = error_of(httpx.post(url, json={"model": "alpha", "messages": msgs, "max_tokens": 100_000}), 400)
    assert too_long["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        chat(client, model="nope")
    with pytest.raises(openai.BadRequestError):
        chat(client, max_tokens=100_000, stream=True)


def test_no_live_worker_is_503(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with Fleet(root=tmp_path) as f:  # an API server whose controller is not running
        f.api()
        wait_until(
            lambda: httpx.get(f.api_url + "/health").status_code == 200,
            timeout=60,
            procs=[f.procs["api"]],
            what="api health",
        )
        r = httpx.post(
            f.api_url + "/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert error_of(r, 503)


async def test_client_disconnect_frees_the_sequence(fleet: Fleet) -> None:
    status_url = f"http://127.0.0.1:{fleet.alpha_port}/worker/status"
    body = {
        "model": "alpha",
        "stream": True,
        "max_tokens": 400,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "Go on forever."}],
    }
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", fleet.api_url + "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break
            assert (await http.get(status_url)).json()["running"] == 1
        for _ in range(100):  # the worker drops the row at its next step
            if (await http.get(status_url)).json()["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await http.get(status_url)).json()["running"] == 0


def test_lmfleet_serve_demo_runs_the_whole_stack(tmp_path: Path) -> None:
    from tests.conftest import Proc, module_cmd

    port = free_port()
    cmd = module_cmd(
        "cli",
        "serve",
        "--demo",
        "--demo-dir",
        str(tmp_path / "demo"),
        "--port",
        str(port),
        "--controller-port",
        str(free_port()),
        "--worker-port",
        str(free_port(2)),  # one port per worker
    )
    proc = Proc("serve", cmd, tmp_path / "serve.log").start()
    try:
        wait_until(
            lambda: "lmfleet is serving" in proc.log.read_text(), timeout=180, procs=[proc], what="lmfleet serve"
        )
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["lmfleet-demo"]
        reply = client.chat.completions.create(
            model="lmfleet-demo", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.role == "assistant"
    finally:
        proc.stop(timeout=20)
    assert proc.popen.returncode == 0, proc.tail()
