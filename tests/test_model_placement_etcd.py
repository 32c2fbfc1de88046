"""Model placement through a shared registry: two real controllers on one real etcd, an API server that knows both,
and fake workers that load models on demand (tests/api/fakes.py) registering their models' states with one
controller. Requests for a model go to the worker that holds it, also once that controller is gone; when that
worker dies mid-stream its streams resume on the other worker, which loads the model."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from lmfleet.api.app import ApiSettings, create_app
from lmfleet.controller.app import ControllerSettings
from lmfleet.controller.app import create_app as create_controller
from lmfleet.controller.etcd import EtcdSettings
from tests.api.fakes import API, FakeWorker, Switchable, Unreachable, Vocab, expected_reply, sse_events
from tests.etcdserver import EtcdCluster
from tests.fakes import running

pytestmark = pytest.mark.timeout(120)

MODELS = ["m1", "m2", "m3"]
C1, C2 = "http://c1.test", "http://c2.test"
WORDS = "one two three four five six"
GB = 1 << 30


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster.local(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def status(holding: str | None) -> dict[str, Any]:
    models = [
        {"name": m, "state": "loaded" if m == holding else "unloaded", "memory_bytes": 2 * GB if m == holding else 0}
        for m in MODELS
    ]
    return {"model_names": MODELS, "models": models, "memory_budget_bytes": 8 * GB, "protocol": "lmfleet"}


@contextlib.asynccontextmanager
async def fleet(etcd: EtcdCluster) -> AsyncIterator[tuple[Any, ...]]:
    """Two controllers on one etcd, workers `a` (holding m1) and `b` (holding nothing) registered with the first,
    and an API server that knows both controllers; yields (a client of the API, the client that reaches the
    controllers and workers, the API's router, the controllers, the workers)."""
    settings = ControllerSettings(etcd=EtcdSettings.from_url(etcd.url, prefix="/test/placement/"))
    vocab = Vocab()
    workers = {name: FakeWorker(name, vocab) for name in "ab"}
    for w in workers.values():
        w.models = list(MODELS)
    async with contextlib.AsyncExitStack() as stack:
        controllers: dict[str, Any] = {}
        for address in (C1, C2):
            asgi, _ = await stack.enter_async_context(running(create_controller(settings)))
            controllers[address] = SimpleNamespace(app=asgi, down=False)
        mounts: dict[str, httpx.AsyncBaseTransport] = {a: Switchable(c) for a, c in controllers.items()}
        mounts |= {w.address: Switchable(w) for w in workers.values()}
        http = await stack.enter_async_context(httpx.AsyncClient(mounts=mounts, transport=Unreachable()))
        for w, holding in ((workers["a"], "m1"), (workers["b"], None)):
            body = {"worker_name": w.address, "worker_status": status(holding)}
            assert (await http.post(C1 + "/register_worker", json=body)).status_code == 200
        api = create_app(ApiSettings(controller_address=f"{C1},{C2}"), http_client=http)
        asgi, state = await stack.enter_async_context(running(api))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=API)
        )
        router = state["router"]

        async def both_known() -> None:
            while len(router.workers()) < 2:
                await router.refresh()
                await asyncio.sleep(0.05)

        await asyncio.wait_for(both_known(), 30)
        yield client, http, router, controllers, workers


async def test_the_holder_serves_its_model_across_controllers_and_its_streams_resume_on_a_loader(
    etcd: EtcdCluster,
) -> None:
    async with fleet(etcd) as (api, http, router, controllers, workers):
        body = {"model": "m1", "messages": [{"role": "user", "content": WORDS}]}
        for _ in range(3):
            assert (await api.post("/v1/chat/completions", json=body)).status_code == 200
        assert (len(workers["a"].requests), len(workers["b"].requests)) == (3, 0)
        models = (await api.get("/v1/models")).json()["data"]
        assert {m["id"]: m["status"]["value"] for m in models} == {"m1": "loaded", "m2": "unloaded", "m3": "unloaded"}

        controllers[C1].down = True  # the controller they registered with is gone: the other one knows them
        beat = {"worker_name": workers["b"].address, "worker_status": status("m2")}  # b loaded m2 meanwhile
        assert (await http.post(C2 + "/receive_heart_beat", json=beat)).json() == {"exist": True}
        await router.refresh()
        assert router.controller_up
        models = (await api.get("/v1/models")).json()["data"]
        assert {m["id"]: m["status"]["value"] for m in models} == {"m1": "loaded", "m2": "loaded", "m3": "unloaded"}
        for _ in range(2):
            assert (await api.post("/v1/chat/completions", json=body)).status_code == 200
        assert (len(workers["a"].requests), len(workers["b"].requests)) == (5, 0)

        workers["a"].then, workers["a"].after = "break", 3  # a dies mid-stream
        streams = await asyncio.gather(
            *(api.post("/v1/chat/completions", json={**body, "stream": True}) for _ in range(2))
        )
        for resp in streams:
            events = sse_events(resp.text)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected_reply(WORDS)
        assert [r.resume_token_ids for r in workers["b"].requests] == [[1, 2], [1, 2]]  # b loads m1 and resumes
