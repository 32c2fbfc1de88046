"""The OpenAI-compatible API server: the public data plane. Never imports torch.

Routes
    GET  /v1/models              the controller's `/list_models`, as OpenAI model cards
    GET  /v1/models/{model}      one card, or 404 model_not_found
    POST /v1/chat/completions    ChatCompletionRequest -> ChatCompletion | SSE of ChatCompletionChunk
    POST /v1/completions         CompletionRequest -> Completion | SSE of CompletionChunk
    POST /                       = /v1/chat/completions (FastChat users post here, often without `model`)
    GET  /health, /docs, /openapi.json

Owns: the request edge (API keys, body size, CORS), choosing the model (`model` may be omitted when exactly one
model is served or `default_model` is set), asking the controller for a worker per choice, and turning the
answer into a response (lmfleet.api.streaming). Knows nothing of tokens: the worker validates prompt length
against the model's context and its errors (400 context_length_exceeded, 429) pass through unchanged.

Errors: every error body is `{"error": {"message", "type", "param", "code"}}` (lmfleet.errors). Unknown model →
404 model_not_found; a listed model with no live worker → 503 no_worker_available; API key missing or wrong → 401;
body over `max_request_bytes` → 413 (from Content-Length, or counted while a chunked body arrives). FastAPI's 422
never appears, in answers or in the OpenAPI schema.

Resources (one pooled httpx client, the controller and worker clients) live in the lifespan state; nothing
happens at import.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypedDict

import httpx
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmfleet import __version__, errors
from lmfleet.api.streaming import (
    CHAT,
    COMPLETION,
    ChoiceSpec,
    EventStreamResponse,
    Shape,
    cancel_on_disconnect,
    close_all,
    collect,
    event_stream,
    open_choices,
)
from lmfleet.client import ControllerClient, WorkerClient, make_http_client
from lmfleet.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger("lmfleet.api")

DEFAULT_CONTROLLER = "http://127.0.0.1:21001"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


@dataclass
class ApiSettings:
    """Everything `lmfleet api` is told on its command line (flags in lmfleet.cli). Secrets never print."""

    controller_address: str = DEFAULT_CONTROLLER  # comma-separated list accepted; the first is used for now
    api_keys: list[str] | None = field(default=None, repr=False)  # None: no authentication
    default_model: str | None = None  # used when a request names no model
    allow_origins: list[str] | None = None  # CORS origins; None: CORS off
    registration_secret: str | None = field(default=None, repr=False)  # sent to the controller when set
    max_request_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.controller_addresses:
            raise ValueError("controller_address must name at least one controller")
        if self.api_keys is not None and (not self.api_keys or not all(self.api_keys)):
            raise ValueError("api_keys must be None or a list of non-empty keys")
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")

    @property
    def controller_addresses(self) -> list[str]:
        return [a.strip() for a in self.controller_address.split(",") if a.strip()]


class ApiState(TypedDict):
    """The lifespan state every request sees as `request.state`."""

    controller: ControllerClient
    workers: WorkerClient
    started: int  # `created` of the model cards


# ---------------------------------------------------------------------------------------------------------------
# Edge middleware (pure ASGI: they run before any body is read)


def _needs_key(scope: Scope) -> bool:
    path = scope["path"]
    return path == "/v1" or path.startswith("/v1/") or (path == "/" and scope["method"] == "POST")


class ApiKeyGate:
    """`Authorization: Bearer <key>` on /v1/* and POST /; /health, /docs and /openapi.json stay public. Each key
    is compared in constant time; the presented key is never logged or echoed."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in keys]

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        presented = token.strip().encode("latin-1")
        matches = [hmac.compare_digest(presented, key) for key in self._keys]  # no short-circuit
        return scheme.lower() == "bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _needs_key(scope) and not self._authorized(scope):
            logger.info("refused %s %s: missing or invalid API key", scope["method"], scope["path"])
            exc = errors.AuthenticationFailed(
                "Missing or invalid API key: send it as 'Authorization: Bearer <key>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over `max_bytes`: at once when Content-Length says so, else as soon as the
    streamed body passes the limit (the route's body parsing then fails with the 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"The request body is larger than the limit of {max_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            exc = errors.PayloadTooLarge(self.message)
            await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)  # FastAPI re-raises it from body parsing
            return message

        await self.app(scope, counting_receive, send)


# ---------------------------------------------------------------------------------------------------------------
# Model and worker resolution


async def _resolve_model(controller: ControllerClient, requested: str | None, default: str | None) -> str:
    if requested:
        return requested
    if default:
        return default
    served = await controller.list_models()
    if len(served) == 1:
        return served[0]
    if not served:
        raise errors.NoWorkerAvailable("No model is being served right now.", headers={"Retry-After": "1"})
    raise errors.InvalidRequest(
        f"You must provide a model parameter; this server serves: {', '.join(sorted(served))}.", param="model"
    )


async def _worker_for(controller: ControllerClient, model: str) -> str:
    """A live worker's address. Asked once per choice, so the controller's policy spreads n choices."""
    address = await controller.get_worker_address(model)
    if address:
        return address
    if model not in await controller.list_models():
        raise errors.ModelNotFound(f"The model `{model}` does not exist.", param="model")
    raise errors.NoWorkerAvailable(
        f"No worker for the model `{model}` is available right now; retry later.", headers={"Retry-After": "1"}
    )


# ---------------------------------------------------------------------------------------------------------------
# The app

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
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return {200: ok, **_ERRORS}


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


def create_app(settings: ApiSettings, *, http_client: httpx.AsyncClient | None = None) -> FastAPI:
    """The API server. `http_client` (for tests, or to share a pool) is used as given and not closed."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[ApiState]:
        async with contextlib.AsyncExitStack() as stack:
            http = http_client or await stack.enter_async_context(make_http_client())
            controller = ControllerClient(http, settings.controller_addresses[0], secret=settings.registration_secret)
            logger.info(
                "API server ready: controller=%s api_keys=%s cors=%s default_model=%s",
                controller.address,
                f"{len(settings.api_keys)} key(s)" if settings.api_keys else "off",
                settings.allow_origins or "off",
                settings.default_model,
            )
            yield {"controller": controller, "workers": WorkerClient(http), "started": int(time.time())}

    app = FastAPI(
        title="lmfleet",
        summary="OpenAI-compatible API over a fleet of model workers",
        version=__version__,
        lifespan=lifespan,
    )
    errors.install_handlers(app)
    _strip_validation_422(app)
    # Added innermost first: CORS (answers preflights) → API keys → body size → routes.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    if settings.api_keys:
        app.add_middleware(ApiKeyGate, keys=settings.api_keys)
    if settings.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    async def answer(request: Request, body: ChatCompletionRequest | CompletionRequest, shape: Shape) -> Response:
        controller: ControllerClient = request.state.controller
        model = await _resolve_model(controller, body.model, settings.default_model)
        meta = shape.new_meta(model)
        specs = [
            ChoiceSpec(i, body.prompt_index(i), body.to_generate_request(f"{meta.id}-{i}", model, choice=i))
            for i in range(body.num_choices)
        ]
        # Until the first chunk of every choice is in hand (a long prefill, a queue) the client may leave too.
        opening = open_choices(specs, partial(_worker_for, controller, model), request.state.workers)
        streams = await cancel_on_disconnect(request.receive, opening)
        if streams is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if body.stream:
            events = event_stream(streams, shape, meta, include_usage=body.include_usage)
            return EventStreamResponse(events, cleanup=partial(close_all, streams))
        try:
            result = await cancel_on_disconnect(request.receive, collect(streams, shape, meta))
        finally:
            await close_all(streams)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(result.model_dump(mode="json"))

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"])
    async def list_models(request: Request) -> ModelList:
        names = await request.state.controller.list_models()
        return ModelList(data=[ModelCard(id=name, created=request.state.started) for name in names])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS, tags=["openai"])
    async def retrieve_model(model: str, request: Request) -> ModelCard:
        if model not in await request.state.controller.list_models():
            raise errors.ModelNotFound(f"The model `{model}` does not exist.", param="model")
        return ModelCard(id=model, created=request.state.started)

    @app.post(
        "/v1/chat/completions", response_model=ChatCompletion, responses=_with_stream(ChatCompletion), tags=["openai"]
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer(request, body, CHAT)

    @app.post(
        "/",
        response_model=ChatCompletion,
        responses=_with_stream(ChatCompletion),
        tags=["fastchat"],
        summary="Chat completions (FastChat-compatible alias of /v1/chat/completions)",
    )
    async def chat_completions_root(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer(request, body, CHAT)

    @app.post("/v1/completions", response_model=Completion, responses=_with_stream(Completion), tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer(request, body, COMPLETION)

    return app
