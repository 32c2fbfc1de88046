"""A multi-model worker end to end, as real processes: one worker configured (--models-config) with three real
models (SmolLM2 and Qwen2.5-Coder 0.5B on llama.cpp, the MiniLM embedding model) and room for two, behind a
controller and an API server, asked with the official `openai` client.

Memory is the models' processes' resident memory as the worker reports it (`ModelState.memory_bytes`, read from
/proc); the README states the margin over the budget asserted here."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Fleet, free_port, module_cmd, wait_until
from tests.scrape import parse

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(600)

BUDGET = 1200 << 20  # room for two of the three (their processes: ~260, ~660 and ~460 MiB)
MARGIN = 128 << 20  # the budget is kept from measured (or, before a model's first load, estimated) memory


@pytest.fixture(scope="module")
def fleet(
    smollm2_gguf: Path, qwen05_gguf: Path, minilm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Fleet, str]]:
    root = tmp_path_factory.mktemp("multimodel")
    config = root / "models.ini"
    config.write_text(
        "[*]\nthreads = 1\nmax-model-len = 2048\n\n"
        f"[smollm2]\npath = {smollm2_gguf}\n\n[qwen05]\npath = {qwen05_gguf}\n\n[minilm]\npath = {minilm}\n"
    )
    worker_url = f"http://127.0.0.1:{free_port()}"
    with Fleet(root, env={"HF_HUB_OFFLINE": "1"}) as f:
        f.controller()
        f.add(
            "worker",
            module_cmd(
                "worker",
                "--port",
                worker_url.rsplit(":", 1)[1],
                "--models-config",
                str(config),
                "--max-loaded-models",
                "2",
                "--memory-budget",
                str(BUDGET),
                "--keep-alive",
                "10m",
                "--controller-address",
                f.controller_url,
                "--heartbeat-interval",
                "0.5",
            ),
        )
        f.api()
        f.wait_models(3)
        yield f, worker_url


def status(worker_url: str) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(worker_url + "/worker/status", timeout=5).json()["models"]}


def loads(worker_url: str, model: str) -> float:
    return parse(httpx.get(worker_url + "/metrics", timeout=5).text).value(
        "lmfleet_worker_model_loads_total", model=model
    )


def client(f: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f.api_url + "/v1", api_key="x", max_retries=0, timeout=300)


def ask(c: openai.OpenAI, model: str, **extra: object) -> None:
    if model == "minilm":
        out = c.embeddings.create(model=model, input=["A cat sat on the mat."], extra_body=extra or None)
        assert len(out.data[0].embedding) == 384
    else:
        chat = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=4,
            temperature=0,
            extra_body=extra or None,
        )
        assert chat.choices[0].message.content


def test_requests_alternating_across_three_models_with_room_for_two_are_all_answered_within_the_budget(
    fleet: tuple[Fleet, str],
) -> None:
    f, worker_url = fleet
    peaks = {"bytes": 0, "loaded": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with_memory = status(worker_url).values()
            peaks["bytes"] = max(peaks["bytes"], sum(m["memory_bytes"] for m in with_memory))
            peaks["loaded"] = max(peaks["loaded"], sum(m["memory_bytes"] > 0 for m in with_memory))
            done.wait(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        c = client(f)
        for _ in range(2):
            for model in ("smollm2", "minilm", "qwen05"):
                ask(c, model)  # any error (a 5xx included) raises
    finally:
        done.set()
        sampler.join()
    assert peaks["loaded"] <= 2
    assert peaks["bytes"] <= BUDGET + MARGIN, peaks
    evicted = parse(httpx.get(worker_url + "/metrics", timeout=5).text).value(
        "lmfleet_worker_model_unloads_total", reason="evicted"
    )
    assert evicted >= 4  # every switch to the third model unloaded one


def test_sixteen_requests_at_once_for_an_unloaded_model_load_it_once(fleet: tuple[Fleet, str]) -> None:
    f, worker_url = fleet
    r = httpx.post(worker_url + "/worker/models/unload", json={"model": "smollm2"}, timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "unloaded", r.text
    before = loads(worker_url, "smollm2")
    c = client(f)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: ask(c, "smollm2"), range(16)))
    assert loads(worker_url, "smollm2") == before + 1
    assert status(worker_url)["smollm2"]["state"] == "loaded"


def test_an_idle_model_is_unloaded_after_its_keep_alive_and_its_memory_returns(fleet: tuple[Fleet, str]) -> None:
    f, worker_url = fleet
    for other in ("smollm2", "qwen05"):  # alone, so nothing but its keep-alive unloads it (not the budget)
        httpx.post(worker_url + "/worker/models/unload", json={"model": other}, timeout=60).raise_for_status()
    ask(client(f), "minilm")  # loaded under the worker's keep-alive: its memory is read while it surely holds it
    held = status(worker_url)["minilm"]["memory_bytes"]
    assert held > 100 << 20
    ask(client(f), "minilm", keep_alive="2s")  # Ollama's per-request keep_alive: the last request's counts
    wait_until(lambda: status(worker_url)["minilm"]["state"] == "unloaded", timeout=60, what="minilm unloaded")
    assert status(worker_url)["minilm"]["memory_bytes"] == 0
    assert parse(httpx.get(worker_url + "/metrics", timeout=5).text).value(
        "lmfleet_worker_model_unloads_total", model="minilm", reason="keep_alive"
    )


def _model_pid(worker_pid: int, model: str) -> int:
    """The pid of the worker's child serving `model`."""
    for task in os.listdir(f"/proc/{worker_pid}/task"):
        for pid in Path(f"/proc/{worker_pid}/task/{task}/children").read_text().split():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if model.encode() in argv and b"--model-names" in argv:
                return int(pid)
    raise LookupError(model)


def test_a_model_whose_process_dies_fails_alone_and_loads_again(fleet: tuple[Fleet, str]) -> None:
    f, worker_url = fleet
    c = client(f)
    ask(c, "qwen05")
    ask(c, "smollm2")
    worker = f.procs["worker"].popen
    assert worker is not None
    os.kill(_model_pid(worker.pid, "smollm2"), signal.SIGKILL)
    wait_until(lambda: status(worker_url)["smollm2"]["state"] == "failed", timeout=30, what="smollm2 failed")
    assert status(worker_url)["qwen05"]["state"] == "loaded"
    ask(c, "qwen05")  # the other model keeps answering
    ask(c, "smollm2")  # and the failed one loads again
    assert status(worker_url)["smollm2"]["state"] == "loaded"
