"""Two multi-model workers that can each load any of three models (SmolLM2 under three names, one thread each),
behind an API server, as real processes: with one controller, and with two controllers on one etcd (each worker
registered with its own controller). Requests for a model go to the worker that holds it; a second worker never
loads it while the first holds it; when that worker is killed mid-stream, its streams resume on the other worker,
which loads the model.

Needs the multi-model worker (lmfleet.worker.multi) and llama.cpp."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Fleet, free_port, module_cmd, wait_until
from tests.etcdserver import EtcdCluster
from tests.scrape import parse

pytest.importorskip("lmfleet.worker.multi")
pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.timeout(600)

MODELS = ("m1", "m2", "m3")
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0}


class Stack:
    def __init__(self, fleet: Fleet, workers: dict[str, str]) -> None:
        self.fleet, self.workers = fleet, workers  # name -> base URL

    def states(self, name: str) -> dict[str, str]:
        body = httpx.get(self.workers[name] + "/worker/status", timeout=5).json()
        return {m["name"]: m["state"] for m in body["models"]}

    def generations(self, name: str) -> float:
        text = httpx.get(self.workers[name] + "/metrics", timeout=5).text
        return parse(text).value("lmfleet_worker_requests_total", route="/worker/generate")

    def chat(self, **extra: object) -> dict:
        resp = httpx.post(self.fleet.api_url + "/v1/chat/completions", json={**CHAT, **extra}, timeout=300)
        assert resp.status_code == 200, resp.text
        return resp.json()


@pytest.fixture(scope="module", params=["one-controller", "etcd-two-controllers"])
def stack(
    request: pytest.FixtureRequest, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fleet-multimodel")
    config = root / "models.ini"
    config.write_text(
        "[*]\nthreads = 1\nmax-model-len = 1024\n\n" + "".join(f"[{m}]\npath = {smollm2_gguf}\n\n" for m in MODELS)
    )
    with contextlib.ExitStack() as stack_:
        etcd = stack_.enter_context(EtcdCluster.local(root / "etcd")) if request.param != "one-controller" else None
        fleet = stack_.enter_context(Fleet(root, env={"OMP_NUM_THREADS": "1"}))
        controllers = [fleet.controller_url]
        if etcd is not None:
            controllers = []
            for name in ("c1", "c2"):
                port = free_port()
                fleet.add(name, module_cmd("controller", "--port", str(port), "--heartbeat-expiration", "3",
                                           "--registry", etcd.url))  # fmt: skip
                controllers.append(f"http://127.0.0.1:{port}")
        else:
            fleet.controller()
        workers = {}
        for i, name in enumerate(("w1", "w2")):
            port = free_port()
            workers[name] = f"http://127.0.0.1:{port}"
            fleet.add(name, module_cmd("worker", "--port", str(port), "--models-config", str(config),
                                       "--controller-address", controllers[i % len(controllers)],
                                       "--heartbeat-interval", "0.5"))  # fmt: skip
        fleet.add(
            "api", module_cmd("api", "--port", str(fleet.api_port), "--controller-address", ",".join(controllers))
        )

        def both_listed() -> bool:
            body = httpx.get(fleet.api_url + "/v1/fleet", timeout=2).json()
            return len(body["workers"]) == 2

        wait_until(both_listed, timeout=180, procs=list(fleet.procs.values()), what="both workers in the API's view")
        yield Stack(fleet, workers)


@pytest.fixture(autouse=True)
def logs_on_failure(stack: Stack, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(stack.fleet.logs())


def test_the_holder_serves_its_model_and_its_streams_resume_on_the_other_worker_when_it_dies(stack: Stack) -> None:
    models = httpx.get(stack.fleet.api_url + "/v1/models", timeout=5).json()["data"]
    assert {m["id"]: m["status"]["value"] for m in models} == dict.fromkeys(MODELS, "unloaded")

    stack.chat(max_tokens=4)  # nobody holds m1: one worker loads it
    (holder,) = [n for n in stack.workers if stack.states(n)["m1"] == "loaded"]
    (other,) = [n for n in stack.workers if n != holder]
    before = {n: stack.generations(n) for n in stack.workers}
    for _ in range(4):
        stack.chat(max_tokens=4)
    assert stack.generations(holder) - before[holder] == 4 and stack.generations(other) == before[other]
    assert stack.states(other)["m1"] == "unloaded"  # never a second load while one worker holds it

    def statuses() -> dict[str, str]:
        models = httpx.get(stack.fleet.api_url + "/v1/models", timeout=5).json()["data"]
        return {m["id"]: m["status"]["value"] for m in models}

    # the API server's view is up to a heartbeat and a refresh old: it may still say `loading` for a moment
    wanted = {"m1": "loaded", "m2": "unloaded", "m3": "unloaded"}
    wait_until(lambda: statuses() == wanted, timeout=30, what=f"/v1/models to say {wanted}")

    # two streams on the holder; it is killed mid-stream; both finish on the other worker, which loads m1
    received = [threading.Event(), threading.Event()]
    results: list[dict] = [{}, {}]

    def stream(i: int) -> None:
        body = {
            **CHAT,
            "stream": True,
            "max_tokens": 160,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        texts, usage, finish, errors = [], None, None, []
        with httpx.stream("POST", stack.fleet.api_url + "/v1/chat/completions", json=body, timeout=300) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    errors.append(chunk["error"])
                    continue
                for choice in chunk["choices"]:
                    texts.append(choice["delta"].get("content") or "")
                    finish = choice["finish_reason"] or finish
                usage = chunk.get("usage") or usage
                if len(texts) >= 4:
                    received[i].set()
        results[i] = {"text": "".join(texts), "usage": usage, "finish": finish, "errors": errors}

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for event in received:
        assert event.wait(120), stack.fleet.logs()
    stack.fleet.procs[holder].signal(signal.SIGKILL)
    for t in threads:
        t.join(300)
    for result in results:
        assert result["errors"] == [] and result["finish"] == "length", result
        assert result["usage"]["completion_tokens"] == 160, result
    assert stack.states(other)["m1"] == "loaded"
    assert stack.generations(other) - before[other] == 2  # the two resumed streams
