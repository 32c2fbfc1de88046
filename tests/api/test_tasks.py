"""Routing by task: a worker says which tasks it serves (`generate`, `embed`, `score`; a FastChat worker, which says
nothing, generates), and the API server sends each request only to workers of its task."""

from __future__ import annotations

import pytest

from lmfleet import errors
from lmfleet.protocol.worker import WorkerStatus

from .fakes import Fleet
from .test_routing import router_for


def test_a_status_without_tasks_means_generate() -> None:
    assert WorkerStatus(model_names=["m"]).tasks == ["generate"]
    assert WorkerStatus.model_validate({"model_names": ["e"], "tasks": ["embed"]}).tasks == ["embed"]
    # a task this version does not know (a newer worker's) is carried, not refused: the worker still registers
    assert WorkerStatus.model_validate({"model_names": ["e"], "tasks": ["transcribe"]}).tasks == ["transcribe"]


async def test_requests_go_to_the_workers_of_their_task_only() -> None:
    fleet = Fleet({"chat": ["a"], "mixed": ["b", "c"], "vectors": ["c"], "speech": ["d"]})
    listed = fleet.controller.workers
    embedder = fleet.workers["c"].address

    def with_tasks() -> list[dict]:
        rows = listed()
        for row in rows:
            if row["address"] == embedder:
                row["status"]["tasks"] = ["embed", "score"]  # an embedding model also scores (cosine)
                row["status"]["context_length"] = 256
            if row["address"] == fleet.workers["d"].address:
                row["status"]["tasks"] = ["transcribe"]  # a newer worker's task
        return rows

    fleet.controller.workers = with_tasks  # type: ignore[method-assign]
    async with router_for(fleet) as router:
        await router.refresh()
        with pytest.raises(errors.InvalidRequest, match="does not support embeddings; it serves chat") as chat:
            await router.acquire("chat", task="embed")
        assert chat.value.param == "model"
        with pytest.raises(
            errors.InvalidRequest, match="chat and text completions; it serves embeddings, rerank and score"
        ):
            await router.acquire("vectors")
        with pytest.raises(errors.InvalidRequest, match="does not support rerank and score; it serves chat"):
            await router.acquire("chat", task="score")
        for task, address in (("embed", embedder), ("score", embedder), ("generate", fleet.workers["b"].address)):
            lease = await router.acquire("mixed", task=task)
            assert lease is not None and lease.address == address
            lease.release()
        lease = await router.acquire("vectors", task=None)  # tokenize: any worker of the model
        assert lease is not None and lease.address == embedder
        lease.release()
        assert router.context_length("vectors") == 256 and router.context_length("chat") is None
        with pytest.raises(errors.InvalidRequest, match="it serves transcribe"):
            await router.acquire("speech")
