"""The operator's model controls on the API server: load, unload and pin a model somewhere in the fleet.

    POST /admin/models/load     {"model", "worker"?}            load it where a request would (lmfleet.placement)
    POST /admin/models/unload   {"model", "worker"?}            unload it from every worker holding it
    POST /admin/models/pin      {"model", "pinned"?, "worker"?}  pin (or unpin) it where it is held, else where it
                                                                would load
    -> {"object": "admin.models", "model", "workers": [{"address", "result"}]}: each worker's answer, the model's
       `ModelState` there

Each is forwarded to the worker's `/worker/models/{load,unload,pin}` (lmfleet.protocol.worker.ModelActionRequest);
`worker` names one worker (its address, as `/v1/fleet` lists it) instead. Only workers that load models on demand
(they report `models`) take these; a one-model worker's model is always loaded. After each the worker view is
refreshed, so `/v1/models` and the dashboard show the new state at once.

Who may: the routes live under `ADMIN_PREFIX`, which the API server's key gate (lmfleet.api.app.ApiKeyGate) guards
with the admin keys (`--admin-keys`) when some are set: an API key is then not enough (403). Without admin keys they
take an API key like every other route, and without API keys they are open, like the rest of the API.

Errors in OpenAI's shape (lmfleet.errors): an unknown model 404 model_not_found (503 while it is starting), a
`worker` that does not serve it or cannot load models 400, a worker's own refusal as it sent it, a worker that
does not answer 502.

Does not own: the placement (lmfleet.placement, through the router), the HTTP calls (lmfleet.client), the keys.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from lmfleet import errors
from lmfleet.api.routing import Router
from lmfleet.protocol.worker import ModelActionRequest, ModelName, ModelState, WorkerInfo

logger = logging.getLogger("lmfleet.api")

ADMIN_PREFIX = "/admin/"
Action = Literal["load", "unload", "pin"]


class AdminModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelName
    worker: str | None = Field(default=None, max_length=2048, description="one worker's address; default: placement")


class AdminPinRequest(AdminModelRequest):
    pinned: bool = True


class AdminWorkerResult(BaseModel):
    address: str
    result: ModelState = Field(description="the model's state on the worker, as it answered")


class AdminModelAnswer(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    object: Literal["admin.models"] = "admin.models"
    model: str
    workers: list[AdminWorkerResult]


def _on_demand(worker: WorkerInfo) -> bool:
    return bool(worker.status.models)


def _named(router: Router, model: str, address: str) -> WorkerInfo:
    worker = next((w for w in router.workers() if w.address == address.rstrip("/")), None)
    if worker is None or model not in worker.status.model_names:
        raise errors.InvalidRequest(f"No worker at `{address}` serves the model `{model}`.", param="worker")
    if not _on_demand(worker):
        raise errors.InvalidRequest(f"The worker at `{address}` does not load models on demand.", param="worker")
    return worker


def _targets(router: Router, action: Action, model: str) -> list[WorkerInfo]:
    """The workers an action on `model` goes to when the request names none."""
    held = [w for w in router.holders(model) if _on_demand(w)]
    if action == "unload" or held:
        return held
    target = router.load_target(model)
    return [target] if target is not None and _on_demand(target) else []


def add_routes(app: FastAPI, errors_doc: dict[int | str, dict[str, Any]]) -> None:
    """The admin routes (see the module docstring)."""

    async def act(request: Request, action: Action, body: AdminModelRequest, pinned: bool = True) -> Any:
        router: Router = request.state.router
        await router.refresh(max_age_s=0.2)
        if body.model not in await router.models():
            raise router.unknown(body.model)
        targets = [_named(router, body.model, body.worker)] if body.worker else _targets(router, action, body.model)
        results = []
        for worker in targets:
            if action == "unload":
                router.placement.unloading(worker.address, body.model)
            elif action == "load":
                router.placement.chose(body.model, worker.address)
            logger.info("admin: %s %s on %s", action, body.model, worker.address)
            answer = await request.state.workers.call(
                worker.address,
                f"/worker/models/{action}",
                ModelActionRequest(model=body.model, pinned=pinned),
                ModelState,
            )
            results.append(AdminWorkerResult(address=worker.address, result=answer))
        await router.refresh()
        return AdminModelAnswer(model=body.model, workers=results)

    doc: dict[str, Any] = {"responses": errors_doc, "tags": ["admin"], "response_model": AdminModelAnswer}

    @app.post(ADMIN_PREFIX + "models/load", **doc)
    async def load(body: AdminModelRequest, request: Request) -> Any:
        return await act(request, "load", body)

    @app.post(ADMIN_PREFIX + "models/unload", **doc)
    async def unload(body: AdminModelRequest, request: Request) -> Any:
        return await act(request, "unload", body)

    @app.post(ADMIN_PREFIX + "models/pin", **doc)
    async def pin(body: AdminPinRequest, request: Request) -> Any:
        return await act(request, "pin", body, pinned=body.pinned)
