"""The multi-model worker's HTTP shell: one process serving several models, each loaded on demand in its own
one-model worker process (lmfleet.worker.supervisor says why), as llama-server's router does.

Owns the routes, which forward a request to the process of the model its body names (`model`), loading that model
first when needed, and the lifespan (the supervisor, its keep-alive loop, the fleet membership, stopping every
model's process at the end):

    POST /worker/generate, /worker/embed, /worker/score, /worker/tokenize, /worker/detokenize
                              as on a one-model worker (lmfleet.worker.app), by the body's `model`: 404
                              model_not_found for a model this worker cannot serve; 503 model_loading when the model
                              is not loaded within --load-timeout (or no loaded model can make room), 503
                              model_load_failed when its load fails; streams are passed on as they come. The body's
                              `keep_alive` (Ollama's) sets how long the model stays loaded after the request.
    POST /worker/models/load    {"model"} -> ModelState once loaded (evicting as a request would)
    POST /worker/models/unload  {"model"} -> ModelState once its process exited; 400 model_busy while requests run
    POST /worker/models/pin     {"model", "pinned": true|false} -> ModelState (a pinned model is never unloaded)
    GET  /worker/status         WorkerStatus: every model in `model_names`, each one's `ModelState` in `models`
                                (loaded|loading|unloaded|failed, memory_bytes: its process's RSS, load_seconds),
                                `memory_budget_bytes`, and the requests running through this worker
    GET  /health, /ready        alive; ready while not draining (a model that is not loaded loads on demand)
    GET  /metrics               loads, unloads by reason, load seconds, memory (lmfleet.worker.metrics.ModelMetrics)

The admin routes and the generation routes require the fleet secret when one is configured; a model's own process
listens on a loopback port and is not registered with any controller. FastChat's worker routes are served by
one-model workers only.

Does not own: loading, unloading and the budget (lmfleet.worker.supervisor), the models and their options
(lmfleet.worker.catalog), a generation (the model's one-model worker, lmfleet.worker.app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from lmfleet import docs, errors
from lmfleet.client import DEFAULT_CONTROLLER, ControllerClient, make_http_client
from lmfleet.drain import DEFAULT_EXEMPT, DEFAULT_TIMEOUT_S, Drain, DrainGate
from lmfleet.guard import BearerSecrets, ParsedBodyRoute, RequestGuard
from lmfleet.metrics import install as install_metrics
from lmfleet.metrics import new_registry
from lmfleet.protocol.worker import ModelActionRequest, ModelState, WorkerStatus, duration_seconds
from lmfleet.requestid import RequestIdMiddleware
from lmfleet.worker.catalog import Budget, ModelSpec
from lmfleet.worker.metrics import ModelMetrics
from lmfleet.worker.registration import HEARTBEAT_INTERVAL_S, Registration
from lmfleet.worker.supervisor import Lease, ModelProcess, Supervisor, child_starter

logger = logging.getLogger("lmfleet.worker")

_FORWARDED = ("content-type", "authorization", "x-request-id")  # request headers a model's process sees
_RETURNED = ("content-type", "retry-after")  # response headers passed back
_TASK_ORDER = ("generate", "embed", "score")
DRAIN_EXEMPT = DEFAULT_EXEMPT | {"/worker/status"}  # readable while draining


@dataclass
class MultiWorkerSettings:
    models: list[ModelSpec]
    worker_address: str
    budget: Budget = field(default_factory=Budget)
    controller_addresses: list[str] = field(default_factory=lambda: [DEFAULT_CONTROLLER])  # [] = no register
    options: dict[str, Any] = field(default_factory=dict)  # engine options every model's process gets
    child_log: list[str] = field(default_factory=list)  # --log-level / --log-format for the models' processes
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    registration_secret: str | None = field(default=None, repr=False)
    speed: float = 1.0
    max_request_bytes: int = 32 << 20
    drain_timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


class MultiWorkerState(TypedDict):
    supervisor: Supervisor
    http: httpx.AsyncClient


class _Forwarded(StreamingResponse):
    """A model process's answer passed on as it streams; the lease and the upstream response are released however
    it ends (finished, client gone: closing the upstream aborts the generation there)."""

    def __init__(self, upstream: httpx.Response, lease: Lease) -> None:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() in _RETURNED}
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code, headers=headers)
        self._upstream = upstream
        self._lease = lease

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._upstream.aclose()
            self._lease.release()


def status(settings: MultiWorkerSettings, supervisor: Supervisor) -> WorkerStatus:
    models = supervisor.states()
    tasks = {t for m in models for t in m.tasks}
    running = supervisor.running
    return WorkerStatus(
        model_names=settings.names,
        speed=settings.speed,
        queue_length=running,
        running=running,
        tasks=[t for t in _TASK_ORDER if t in tasks] + sorted(tasks - set(_TASK_ORDER)),
        models=models,
        memory_budget_bytes=settings.budget.memory_bytes,
    )


def create_app(
    settings: MultiWorkerSettings,
    *,
    start: Callable[[ModelSpec], Awaitable[ModelProcess]] | None = None,
    drain: Drain | None = None,
    http_client: httpx.AsyncClient | None = None,
) -> FastAPI:
    """The multi-model worker app. `start` starts a model's process (default: its one-model worker as a child,
    lmfleet.worker.supervisor.child_starter); `drain` is the one the process runner awaits on SIGTERM;
    `http_client` is used as given and not closed."""
    drain = drain or Drain(settings.drain_timeout_s)
    registry = new_registry()
    metrics = ModelMetrics(registry)
    starter = start or child_starter(settings.options, settings.child_log)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[MultiWorkerState]:
        async with contextlib.AsyncExitStack() as stack:
            http = http_client if http_client is not None else await stack.enter_async_context(make_http_client())
            supervisor = Supervisor(settings.models, settings.budget, start=starter, http=http, hooks=metrics)
            stack.push_async_callback(supervisor.close)  # last: after the drain and leaving the controllers
            metrics.states = supervisor.states
            reaper = asyncio.create_task(supervisor.run(), name="lmfleet-models")
            stack.callback(reaper.cancel)
            supervisor.preload()
            controllers = [
                ControllerClient(http, a, secret=settings.registration_secret) for a in settings.controller_addresses
            ]
            membership = Registration(
                controllers,
                settings.worker_address,
                status=lambda: status(settings, supervisor),
                serving=lambda: not drain.draining,
                interval_s=settings.heartbeat_interval_s,
            )
            stack.push_async_callback(membership.leave)
            drain.on_start(membership.leave)
            membership.start()
            logger.info(
                "worker for %s ready at %s (at most %d loaded, %d MiB)",
                settings.names,
                settings.worker_address,
                settings.budget.max_loaded,
                settings.budget.memory_bytes >> 20,
            )
            yield {"supervisor": supervisor, "http": http}

    app = docs.fastapi_app(title="lmfleet multi-model worker", lifespan=lifespan)
    app.router.route_class = ParsedBodyRoute
    errors.install_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)
    app.add_middleware(DrainGate, drain=drain, exempt=DRAIN_EXEMPT)
    install_metrics(app, registry, part="lmfleet_worker")
    app.add_middleware(RequestIdMiddleware)

    secret = BearerSecrets([settings.registration_secret] if settings.registration_secret else [])

    def require_secret(request: Request) -> None:
        if secret and not secret.match(request.headers.get("authorization")):
            raise errors.AuthenticationFailed(
                "this worker requires the fleet secret: send 'Authorization: Bearer <secret>'"
            )

    async def forward(request: Request, path: str) -> Response:
        """The request to its model's process (loaded first), the answer back as it comes."""
        payload = await request.json()
        if not isinstance(payload, dict):
            raise errors.InvalidRequest("the body must be a JSON object")
        try:
            keep_alive = duration_seconds(payload.get("keep_alive"))
        except ValueError as exc:
            raise errors.InvalidRequest(str(exc), param="keep_alive") from None
        supervisor: Supervisor = request.state.supervisor
        lease = await supervisor.acquire(payload.get("model"), keep_alive)
        http: httpx.AsyncClient = request.state.http
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        try:
            upstream = await http.send(
                http.build_request("POST", lease.address + path, content=await request.body(), headers=headers),
                stream=True,
            )
        except httpx.HTTPError as exc:
            lease.release()
            raise errors.UpstreamError(f"the model's process did not answer: {exc}") from None
        except BaseException:
            lease.release()
            raise
        return _Forwarded(upstream, lease)

    for path in ("/worker/generate", "/worker/embed", "/worker/score", "/worker/tokenize", "/worker/detokenize"):

        async def route(request: Request, _path: str = path) -> Response:
            return await forward(request, _path)

        app.add_api_route(path, route, methods=["POST"], dependencies=[Depends(require_secret)])

    @app.post("/worker/models/load", dependencies=[Depends(require_secret)])
    async def load(body: ModelActionRequest, request: Request) -> ModelState:
        return await request.state.supervisor.load(body.model)

    @app.post("/worker/models/unload", dependencies=[Depends(require_secret)])
    async def unload(body: ModelActionRequest, request: Request) -> ModelState:
        return await request.state.supervisor.unload(body.model)

    @app.post("/worker/models/pin", dependencies=[Depends(require_secret)])
    async def pin(body: ModelActionRequest, request: Request) -> ModelState:
        return request.state.supervisor.pin(body.model, body.pinned)

    @app.get("/worker/status")
    async def worker_status(request: Request) -> WorkerStatus:
        return status(settings, request.state.supervisor)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        if drain.draining:
            raise errors.ServiceUnavailable("worker is draining")
        return {"status": "ready"}

    return app
