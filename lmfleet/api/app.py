"""The OpenAI-compatible API server: the public data plane. Never imports torch.

Routes
    GET  /v1/models              every model the live workers in the cached view can serve, loaded or not, as
                                 OpenAI model cards with llama-server's `status` ({"value": loaded|loading|unloaded})
    GET  /v1/models/{model}      one card, or 404 model_not_found (503 for a model the server expects, starting)
    POST /v1/chat/completions    ChatCompletionRequest -> ChatCompletion | SSE of ChatCompletionChunk
    POST /v1/completions         CompletionRequest -> Completion | SSE of CompletionChunk
    POST /                       = /v1/chat/completions (FastChat users post here, often without `model`)
    POST /v1/embeddings          EmbeddingRequest -> EmbeddingResponse (embedding models only; lmfleet.api.oneshot)
    POST /tokenize, /detokenize  vLLM's shapes, through the model's own tokenizer (any model)
    POST /v1/rerank, /v1/score   (and /rerank, /score) cross-encoders and embedding models (lmfleet.api.rerank)
    POST /v1/responses, GET|DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items
                                 OpenAI's Responses API over the one answer path (lmfleet.api.responses)
    POST /v1/messages, /v1/messages/count_tokens
                                 Anthropic's Messages API over the one answer path (lmfleet.api.messages); its
                                 errors in Anthropic's shape
    GET  /health                 alive (always 200)
    GET  /ready                  can serve: 200 while some worker is in rotation and the server is not draining
    GET  /docs, /redoc, /openapi.json   served offline (lmfleet.docs)
    GET  /ui, /v1/fleet, GET /   the web page: chat playground and fleet dashboard (lmfleet.api.ui)
    GET  /metrics                Prometheus (lmfleet.api.metrics); needs a key unless `metrics_public`
    POST /admin/models/{load,unload,pin}   the operator's model controls (lmfleet.api.admin); the admin keys when
                                 set, else an API key

Owns: the request edge (API keys, CORS; body size and JSON sanity are lmfleet.guard's, public routes and
per-request limits lmfleet.api.access's, the one request timer lmfleet.metrics'), and which renderer answers each
route. Every generating route goes the one answer path (lmfleet.api.answer: limits, the model — `model` may be
omitted when exactly one model is served or `default_model` is set —, a worker per choice picked from a cached
view of the fleet that outlives the controller (lmfleet.api.routing; FastChat's controller and workers are
spoken to their way: lmfleet.api.fastchat_upstream), failover to another worker before and
after the first token (lmfleet.api.upstream), SSE or one JSON body); each endpoint only spells the answer
(lmfleet.api.render, lmfleet.api.responses). A graceful drain: lmfleet.drain. Knows nothing of tokens: the worker
validates prompt length against the model's context and its errors (400 context_length_exceeded, 429) pass
through unchanged.

Errors: every error body is `{"error": {"message", "type", "param", "code"}}` (lmfleet.errors), but on the
Anthropic routes, where it is `{"type": "error", "error": {"type", "message"}}` with the same status. Unknown model
→ 404 model_not_found; a model served a moment ago with no worker now, or one of `expected_models` before its
worker registers → 503 no_worker_available with Retry-After (lmfleet.api.routing); a worker failure no other worker
could make up for → 502 (or an SSE error event once the answer has started); API key (`Authorization: Bearer` or
`x-api-key`) missing or wrong → 401 (on every route but `access.PUBLIC_PATHS`; an API key on an admin route when
admin keys are set → 403); body over `max_request_bytes` → 413; a body that is not one sane JSON object → 400
(lmfleet.guard); a value over an operator's limit → 400 naming it (`access.RequestLimits`). FastAPI's 422 never
appears, in answers or in the OpenAPI schema.

Resources (one pooled httpx client, the controller and worker clients, the router and its refresh task) live in
the lifespan state; nothing happens at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypedDict, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from lmfleet import __version__, docs, errors
from lmfleet.api import admin as admin_api
from lmfleet.api import messages as messages_api
from lmfleet.api import rerank as rerank_api
from lmfleet.api import responses as responses_api
from lmfleet.api import ui
from lmfleet.api.access import PUBLIC_PATHS, RequestLimits, needs_key, presented_key, route_path
from lmfleet.api.answer import AnswerPath
from lmfleet.api.fastchat_upstream import FallbackControllerClient, MixedWorkerClient
from lmfleet.api.fleet import FleetStats
from lmfleet.api.metrics import ApiMetrics
from lmfleet.api.oneshot import ask
from lmfleet.api.render import ChatRenderer, CompletionRenderer
from lmfleet.api.response_store import TEMPORARY, ResponseStore
from lmfleet.api.routing import Router
from lmfleet.api.sse import cancel_on_disconnect
from lmfleet.api.upstream import Timeouts
from lmfleet.client import DEFAULT_CONTROLLER, ControllerClient, make_http_client
from lmfleet.dispatch import DEFAULT_POLICY, get_policy
from lmfleet.drain import DEFAULT_TIMEOUT_S, Drain, DrainGate
from lmfleet.guard import BearerSecrets, ParsedBodyRoute, RequestGuard
from lmfleet.metrics import CLIENT_CLOSED_REQUEST, METRICS_PATH, new_registry
from lmfleet.metrics import install as install_metrics
from lmfleet.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from lmfleet.protocol.errors import ErrorResponse
from lmfleet.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    ModelStatus,
)
from lmfleet.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from lmfleet.protocol.worker import DetokenizeResponse as WorkerDetokenized
from lmfleet.protocol.worker import EmbedResponse, Task
from lmfleet.protocol.worker import TokenizeResponse as WorkerTokenized
from lmfleet.requestid import HEADER, RequestIdMiddleware

logger = logging.getLogger("lmfleet.api")

R = TypeVar("R", bound=BaseModel)


@dataclass
class ApiSettings:
    """Everything `lmfleet api` is told on its command line (flags in lmfleet.api.flags). Secrets never print."""

    controller_address: str = DEFAULT_CONTROLLER  # comma-separated; the first that answers gives the worker view
    api_keys: list[str] | None = field(default=None, repr=False)  # None: no authentication
    default_model: str | None = None  # used when a request names no model
    allow_origins: list[str] | None = None  # CORS origins; None: CORS off
    registration_secret: str | None = field(default=None, repr=False)  # sent to the controller when set
    max_request_bytes: int = 4 * 1024 * 1024
    limits: RequestLimits = field(default_factory=RequestLimits)  # per-request limits (flags), lmfleet.api.access
    dispatch_policy: str = DEFAULT_POLICY  # a key of lmfleet.dispatch.POLICIES
    first_token_timeout_s: float = 60.0  # a worker silent this long before its first chunk has failed
    inter_token_timeout_s: float = 30.0  # ... or this long between two chunks
    model_load_timeout_s: float = 300.0  # ... and this much more before its first chunk when it loads the model first
    refresh_interval_s: float = 1.0  # how often the worker view is fetched from the controller
    eject_backoff_s: float = 1.0  # an ejected worker stays out at least this long
    drain_timeout_s: float = DEFAULT_TIMEOUT_S  # on SIGTERM: how long requests in progress may take to finish
    # stored responses (/v1/responses): a SQLite file, TEMPORARY (deleted at exit), or None: nothing is stored
    responses_db: str | None = TEMPORARY
    metrics_public: bool = False  # GET /metrics without an API key (a scraper that holds none)
    # the admin routes' keys (lmfleet.api.admin); None: an API key (or none, without API keys) will do
    admin_keys: list[str] | None = field(default=None, repr=False)
    expected_models: list[str] = field(default_factory=list)  # 503 (starting), not 404, until a worker serves them

    def __post_init__(self) -> None:
        if not self.controller_addresses:
            raise ValueError("controller_address must name at least one controller")
        for name in ("api_keys", "admin_keys"):
            keys = getattr(self, name)
            if keys is not None and (not keys or not all(keys)):
                raise ValueError(f"{name} must be None or a list of non-empty keys")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        get_policy(self.dispatch_policy)
        self.timeouts()
        for name in ("refresh_interval_s", "eject_backoff_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")

    def timeouts(self) -> Timeouts:
        return Timeouts(
            first_token_s=self.first_token_timeout_s,
            inter_token_s=self.inter_token_timeout_s,
            load_s=self.model_load_timeout_s,
        )

    @property
    def controller_addresses(self) -> list[str]:
        return [a.strip() for a in self.controller_address.split(",") if a.strip()]


class ApiState(TypedDict):
    """The lifespan state every request sees as `request.state`."""

    controller: ControllerClient  # the first of `controller_addresses`
    router: Router  # the worker view, health and the pick (lmfleet.api.routing)
    workers: MixedWorkerClient  # lmfleet and FastChat workers alike (lmfleet.api.fastchat_upstream)
    started: int  # `created` of the model cards
    responses: ResponseStore | None  # stored responses (lmfleet.api.response_store); None: storage off


# ---------------------------------------------------------------------------------------------------------------
# Edge middleware (pure ASGI: they run before any body is read)


class ApiKeyGate:
    """An API key (`Authorization: Bearer <key>` or `x-api-key: <key>`: access.presented_key) on every route but
    `access.PUBLIC_PATHS` (/health, /ready, the docs and /openapi.json), unknown paths included; with admin keys,
    one of those on the admin routes (lmfleet.api.admin; an API key there is 403) and no key elsewhere unless
    there are API keys too. Each key is compared in constant time; the presented key is never logged or echoed."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Sequence[str] | None,
        public: frozenset[str] = PUBLIC_PATHS,
        admin_keys: Sequence[str] | None = None,
    ) -> None:
        self.app = app
        self._keys = BearerSecrets(keys) if keys else None
        self._admin = BearerSecrets(admin_keys) if admin_keys else None
        self._public = public

    def _refusal(self, scope: Scope) -> errors.LmfleetError | None:
        if scope["type"] != "http":
            return None
        key = presented_key(Headers(scope=scope))
        if self._admin is not None and route_path(scope).startswith(admin_api.ADMIN_PREFIX):
            if self._admin.match_token(key):
                return None
            if self._keys is not None and self._keys.match_token(key):
                return errors.Forbidden("This route needs an admin key.")
        elif self._keys is None or not needs_key(scope, self._public) or self._keys.match_token(key):
            return None
        return errors.AuthenticationFailed(
            "Missing or invalid API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            logger.info("refused %s %s: %s", scope["method"], scope["path"], refusal.message)
            await errors.response(refusal, scope)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# The app


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in {
        400: "Invalid request (the message and `param` say what is wrong), or context_length_exceeded",
        401: "Missing or invalid API key",
        404: "model_not_found",
        413: "Request body too large",
        429: "The worker is at capacity; retry after `Retry-After` seconds",
        502: "A worker failed",
        503: "No worker serves the model right now, or the controller is unreachable",
    }.items()
}


def _with_stream(model: type) -> dict[int | str, dict[str, Any]]:
    ok = {
        "description": "The answer; with `stream: true`, server-sent events (`data: {chunk}` ... `data: [DONE]`)",
        "model": model,
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    }
    return {200: ok, **_ERRORS}


# One server-sent event, as OpenAPI tools (schemathesis; OpenAPI 3.2's `itemSchema`) read an event-stream schema.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": 'A chunk as JSON; an error as JSON `{"error": {...}}` (the stream then ends); `[DONE]` last',
        }
    },
}


def _strip_validation_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; this API answers 400 instead (lmfleet.errors)."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: ApiSettings, *, drain: Drain | None = None, http_client: httpx.AsyncClient | None = None
) -> FastAPI:
    """The API server. `drain` is the one the process runner awaits on SIGTERM (lmfleet.server); `http_client` (for
    tests, or to share a pool) is used as given and not closed."""
    drain = drain or Drain(settings.drain_timeout_s)
    metrics = ApiMetrics(new_registry())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[ApiState]:
        async with contextlib.AsyncExitStack() as stack:
            http = http_client if http_client is not None else await stack.enter_async_context(make_http_client())
            controllers = [
                FallbackControllerClient(http, address, secret=settings.registration_secret)
                for address in settings.controller_addresses
            ]
            workers = MixedWorkerClient(http, secret=settings.registration_secret, view=lambda: router.workers())
            router = Router(
                controllers,
                workers,
                policy=settings.dispatch_policy,
                refresh_interval_s=settings.refresh_interval_s,
                eject_backoff_s=settings.eject_backoff_s,
                on_eject=lambda _address: metrics.ejections.inc(),
                expected=settings.expected_models,
                on_model_event=metrics.model_event,
            )
            metrics.router = router
            refresher = asyncio.create_task(router.run(), name="lmfleet-api-worker-view")
            stack.push_async_callback(router.aclose)
            stack.push_async_callback(_cancel, refresher)
            logger.info(
                "API server ready: controllers=%s policy=%s api_keys=%s cors=%s default_model=%s",
                ",".join(c.address for c in controllers),
                settings.dispatch_policy,
                f"{len(settings.api_keys)} key(s)" if settings.api_keys else "off",
                settings.allow_origins or "off",
                settings.default_model,
            )
            responses = None
            if settings.responses_db is not None:
                responses = await stack.enter_async_context(ResponseStore.open(settings.responses_db))
            yield {
                "controller": controllers[0],
                "router": router,
                "workers": workers,
                "started": int(time.time()),
                "responses": responses,
            }

    app = docs.fastapi_app(
        title="lmfleet",
        summary="OpenAI-compatible API over a fleet of model workers",
        version=__version__,
        lifespan=lifespan,
    )
    app.router.route_class = ParsedBodyRoute  # bodies are parsed once, by the guard
    errors.install_handlers(app)
    _strip_validation_422(app)
    # Added innermost first: CORS (answers preflights) → API keys → body size and JSON sanity → routes.
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)
    if settings.api_keys or settings.admin_keys:
        public = PUBLIC_PATHS | {METRICS_PATH} if settings.metrics_public else PUBLIC_PATHS
        app.add_middleware(ApiKeyGate, keys=settings.api_keys, public=public, admin_keys=settings.admin_keys)
    if settings.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", HEADER, "x-api-key", "anthropic-version", "anthropic-beta"],
            expose_headers=[HEADER],
        )
    # Counts every request in progress and, once draining, refuses new ones (503).
    app.add_middleware(DrainGate, drain=drain)
    # GET /metrics, and the one request timer: every request into Prometheus, the generation requests into the
    # dashboard's figures (lmfleet.api.fleet), timed alike.
    stats = FleetStats()
    install_metrics(app, metrics.registry, part="lmfleet_api", sinks=[stats])
    app.add_middleware(RequestIdMiddleware)  # every answer carries X-Request-ID, every log line too
    # Outermost: the routes of another protocol have every error, from any middleware, spelled their way.
    app.add_middleware(errors.ErrorStyles, by_path=messages_api.ERROR_PATHS)
    answer_path = AnswerPath(
        metrics,
        settings.limits,
        settings.timeouts(),
        default_model=settings.default_model,
        on_tokens=stats.tokens,
    )

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse, "description": "Cannot serve now"}})
    async def ready(request: Request) -> dict[str, Any]:
        router: Router = request.state.router
        if drain.draining:
            raise errors.ServiceUnavailable("This server is shutting down.")
        if not router.loaded:
            await router.refresh(max_age_s=0.2)
        workers = len(router.healthy())
        if not workers:
            raise errors.NoWorkerAvailable("No worker is available right now.", headers={"Retry-After": "1"})
        return {"status": "ready", "workers": workers, "controller": "up" if router.controller_up else "down"}

    def card(request: Request, name: str) -> ModelCard:
        router: Router = request.state.router
        state, failed = router.model_state(name)
        return ModelCard(
            id=name,
            created=request.state.started,
            max_model_len=router.context_length(name),
            status=ModelStatus(value=state, failed=failed),
        )

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"])
    async def list_models(request: Request) -> ModelList:
        names = await request.state.router.models()
        return ModelList(data=[card(request, name) for name in names])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS, tags=["openai"])
    async def retrieve_model(model: str, request: Request) -> ModelCard:
        router: Router = request.state.router
        name = router.resolve(model)
        if name not in await router.models():
            raise router.unknown(model)
        return card(request, name)

    async def one_reply(
        request: Request,
        requested: str | None,
        task: Task | None,
        path: str,
        build: Callable[[str], BaseModel],
        answer: type[R],
    ) -> tuple[str, R] | None:
        """(the model, a worker's answer) for a one-reply route (lmfleet.api.oneshot); None if the client left."""
        router: Router = request.state.router
        model = await answer_path.resolve_model(request, requested)
        asking = ask(router, request.state.workers, model, task, path, build(model), answer)
        result = await cancel_on_disconnect(request.receive, asking)
        return None if result is None else (model, result)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS, tags=["openai"])
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        build = partial(body.to_embed_request, f"embd-{uuid.uuid4().hex}")
        got = await one_reply(request, body.model, "embed", "/worker/embed", build, EmbedResponse)
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        model, result = got
        answer = EmbeddingResponse.build(model, result.embeddings, result.prompt_tokens, body.encoding_format)
        return JSONResponse(answer.model_dump(mode="json"))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS, tags=["vllm"])
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        got = await one_reply(request, body.model, None, "/worker/tokenize", body.to_worker, WorkerTokenized)
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        tokens, limit = got[1].tokens, got[1].max_model_len
        return JSONResponse(TokenizeResponse(count=len(tokens), max_model_len=limit, tokens=tokens).model_dump())

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS, tags=["vllm"])
    async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
        got = await one_reply(request, body.model, None, "/worker/detokenize", body.to_worker, WorkerDetokenized)
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(DetokenizeResponse(prompt=got[1].prompt).model_dump())

    @app.post(
        "/v1/chat/completions", response_model=ChatCompletion, responses=_with_stream(ChatCompletion), tags=["openai"]
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer_path.answer(request, body, partial(ChatRenderer, include_usage=body.include_usage))

    @app.post(
        "/",
        response_model=ChatCompletion,
        responses=_with_stream(ChatCompletion),
        tags=["fastchat"],
        summary="Chat completions (FastChat-compatible alias of /v1/chat/completions)",
    )
    async def chat_completions_root(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer_path.answer(request, body, partial(ChatRenderer, include_usage=body.include_usage))

    @app.post("/v1/completions", response_model=Completion, responses=_with_stream(Completion), tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer_path.answer(request, body, partial(CompletionRenderer, include_usage=body.include_usage))

    responses = responses_api.ResponsesConfig(path=answer_path, scoped=bool(settings.api_keys))
    responses_api.add_routes(app, responses, errors_doc=_ERRORS)
    rerank_api.add_routes(app, one_reply, errors_doc=_ERRORS)
    messages = messages_api.MessagesConfig(path=answer_path, one_reply=one_reply)
    messages_api.add_routes(app, messages, errors_doc=_ERRORS)

    admin_api.add_routes(app, errors_doc=_ERRORS)
    ui.install(app, stats)
    return app
