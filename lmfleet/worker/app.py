"""The model worker's HTTP shell: one process, one model.

Owns: loading the model through its engine's loader (lmfleet.engine.registry; in the lifespan, off the event
loop), the settings, the `/worker/*` routes (a generation goes through worker/pipeline.py and comes back as an NDJSON
stream of `GenerateChunk`s), readiness, and the lifespan that starts the engine's runner and the fleet membership.

    POST /worker/generate     GenerateRequest -> NDJSON GenerateChunks (503 while draining)
    POST /worker/embed        EmbedRequest -> EmbedResponse (an embedding model's worker; worker/embed.py)
    POST /worker/score        ScorePairsRequest -> ScorePairsResponse (a cross-encoder's or an embedding model's)
    POST /worker/tokenize     TokenizeRequest -> TokenizeResponse;  POST /worker/detokenize: the reverse
    GET  /worker/status       WorkerStatus
    POST /worker_generate_stream, /worker_get_status, ...   FastChat's worker protocol (worker/fastchat.py)
    GET  /health              alive;  GET /ready: 200 while the engine steps and the worker is not draining
    GET  /metrics             Prometheus: load, KV cache, steps, requests (lmfleet.worker.metrics), open like status

Drain (lmfleet.drain, awaited by the process runner on the first SIGTERM): leave every controller
(worker/registration.py), answer new requests 503, let the open streams finish for up to `drain_timeout_s`; then
uvicorn's graceful shutdown closes what is left, and the API server resumes those generations on another replica.

Does not own: a generation's steps (prompt, fit check, output grammar, admission, text, tool calls, log
probabilities: worker/pipeline.py), batching and sampling (lmfleet.engine), text handling (worker/textgen.py), fleet
membership (worker/registration.py), the prompt prefixes it reports having served (worker/prefixes.py), OpenAI
semantics (lmfleet.api).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import PurePath
from typing import Any, TypedDict, TypeVar

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from lmfleet import docs, errors
from lmfleet.client import DEFAULT_CONTROLLER, ControllerClient, make_http_client
from lmfleet.drain import DEFAULT_EXEMPT, DEFAULT_TIMEOUT_S, Drain, DrainGate
from lmfleet.engine import registry
from lmfleet.engine.base import (
    BatchSettings,
    EmbeddingEngine,
    Engine,
    EngineRejected,
    EngineStats,
    LoadedModel,
    ScoringEngine,
    Tokenizer,
)
from lmfleet.engine.pooling import EmbeddingRunner, ScoringRunner
from lmfleet.engine.runner import DEFAULT_MAX_QUEUED, AsyncEngine
from lmfleet.guard import BearerSecrets, ParsedBodyRoute, RequestGuard
from lmfleet.metrics import install as install_metrics
from lmfleet.metrics import new_registry
from lmfleet.protocol.worker import (
    DetokenizeRequest,
    DetokenizeResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    ScorePairsRequest,
    ScorePairsResponse,
    Task,
    TokenizeRequest,
    TokenizeResponse,
    WorkerStatus,
)
from lmfleet.requestid import RequestIdMiddleware
from lmfleet.worker import embed, fastchat, reasoning, score, tools
from lmfleet.worker.metrics import WorkerMetrics
from lmfleet.worker.pipeline import Pipeline, refusal
from lmfleet.worker.prefixes import ServedPrefixes
from lmfleet.worker.registration import HEARTBEAT_INTERVAL_S, Registration

logger = logging.getLogger("lmfleet.worker")

T = TypeVar("T")

DRAIN_EXEMPT = DEFAULT_EXEMPT | {"/worker/status", "/worker_get_status"}  # readable while draining


@dataclass
class WorkerSettings:
    model_path: str
    worker_address: str  # the URL other processes reach this worker at
    model_names: list[str] | None = None  # default: [model_path] exactly as given
    controller_addresses: list[str] = field(default_factory=lambda: [DEFAULT_CONTROLLER])  # [] = no register
    engine: str = registry.AUTO  # a key of lmfleet.engine.registry.ENGINES, or "auto"
    engine_settings: BatchSettings | None = None  # None: the engine's defaults
    max_queued: int = DEFAULT_MAX_QUEUED  # running + waiting beyond this → 429
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    registration_secret: str | None = field(default=None, repr=False)  # never printed
    speed: float = 1.0
    max_request_bytes: int = 32 << 20  # a GenerateRequest body (413 beyond; lmfleet.guard)
    drain_timeout_s: float = DEFAULT_TIMEOUT_S  # on SIGTERM: how long open streams may take to finish
    tool_parser: str = tools.AUTO  # a key of lmfleet.worker.tools.FORMATS, or "auto" (from the chat template)
    # a key of lmfleet.worker.reasoning.FORMATS, "auto" (from the chat template) or "none" (answers are not split)
    reasoning_parser: str = reasoning.AUTO
    conv_template: str | None = None  # FastChat clients' template: a key of protocol.fastchat.TEMPLATES; None: mapped

    @property
    def names(self) -> list[str]:
        return self.model_names or [self.model_path]

    @property
    def aliases(self) -> list[str]:
        """Without `model_names`: the model's file name without `.gguf`, or its folder's name, which the API server
        also answers to when no other model claims it."""
        if self.model_names:
            return []
        path = PurePath(self.model_path.rstrip("/"))
        alias = path.stem if path.suffix.lower() == ".gguf" else path.name
        return [alias] if alias and alias != self.model_path else []


Loader = Callable[[WorkerSettings], LoadedModel]


def load_model(settings: WorkerSettings) -> LoadedModel:
    """Locate the model, pick its engine (`settings.engine`) and load both engine and tokenizer."""
    source = registry.locate(settings.model_path)
    entry = registry.choose(source, settings.engine)
    given = settings.engine_settings
    if not isinstance(given, entry.settings):  # shared limits carried over to the chosen engine's settings
        names = {f.name for f in fields(entry.settings)}
        given = entry.settings(
            **({f.name: getattr(given, f.name) for f in fields(given) if f.name in names} if given is not None else {})
        )
    return registry.load(source, entry, given)


async def _pooled(work: Awaitable[T]) -> T:
    """A pooling runner's answer (embeddings, scores); its refusal as the public error (429, 503, 400, as for
    generation) and its failure as a 502."""
    try:
        return await work
    except EngineRejected as exc:
        raise refusal(exc) from None
    except RuntimeError as exc:
        raise errors.UpstreamError(str(exc)) from None


class Worker:
    """Per-process state, created in the lifespan: the running engine, its tokenizer, the drain and the fleet
    membership."""

    def __init__(
        self,
        settings: WorkerSettings,
        runner: AsyncEngine | EmbeddingRunner | ScoringRunner,
        tokenizer: Tokenizer,
        drain: Drain,
        engine_name: str,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.tokenizer = tokenizer
        self.drain = drain
        self.engine_name = engine_name
        self.max_model_len = runner.engine.max_model_len
        self.vocab_size = min(runner.engine.vocab_size, len(tokenizer))  # ids both can handle
        self.pipeline = Pipeline(
            tokenizer,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            tool_parser=settings.tool_parser,
            reasoning_parser=settings.reasoning_parser,
        )
        self.prefixes = ServedPrefixes()

    @property
    def serving(self) -> bool:
        """Takes requests: the engine runs and the worker is not draining."""
        return self.runner.ready and not self.drain.draining

    def status(self) -> WorkerStatus:
        s = self.runner.stats()
        return WorkerStatus(
            model_names=self.settings.names,
            aliases=self.settings.aliases,
            speed=self.settings.speed,
            queue_length=s.running + s.waiting,
            running=s.running,
            waiting=s.waiting,
            tokens_in_flight=s.tokens_in_flight,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_hit_rate=s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else None,
            context_length=self.max_model_len,
            engine=self.engine_name,
            tasks=list(self.tasks),
            prefix_hashes=self.prefixes.recent(),
        )

    @property
    def tasks(self) -> tuple[Task, ...]:
        """What this worker serves: an embedding model also scores pairs (the cosine of their vectors)."""
        if isinstance(self.runner, ScoringRunner):
            return ("score",)
        return ("embed", "score") if isinstance(self.runner, EmbeddingRunner) else ("generate",)

    def _generator(self) -> AsyncEngine:
        if not isinstance(self.runner, AsyncEngine):
            raise errors.InvalidRequest(
                "this model does not generate text: it computes embeddings or scores; use /v1/embeddings, "
                "/v1/rerank or /v1/score, not chat or text completions",
                param="model",
            )
        return self.runner

    async def embed(self, req: EmbedRequest) -> EmbedResponse:
        """Vectors for every input: 400 for a generation model, an input that does not fit, a `dimensions` the
        model does not allow; 429 / 503 as for generation."""
        runner = self.runner
        if not isinstance(runner, EmbeddingRunner):
            raise errors.InvalidRequest("this model does not compute embeddings; use an embedding model", param="model")
        embed.check_dimensions(req.dimensions, runner.engine)
        seqs = embed.token_ids(req, self.tokenizer, runner.engine, self.vocab_size)
        vectors = await _pooled(runner.embed(seqs))
        return EmbedResponse(embeddings=embed.shorten(vectors, req.dimensions), prompt_tokens=sum(map(len, seqs)))

    async def score(self, req: ScorePairsRequest) -> ScorePairsResponse:
        """A score per pair (worker/score.py): 400 for a generation model or a pair that does not fit; 429 / 503 as
        for generation."""
        runner = self.runner
        if isinstance(runner, AsyncEngine):
            raise errors.InvalidRequest(
                "this model generates text and does not score; use a cross-encoder or an embedding model",
                param="model",
            )
        return await _pooled(score.score(req, runner, self.tokenizer))

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.messages is not None:
            ids = self.pipeline.chat_ids(req.messages, req.tools, add_generation_prompt=req.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(tokens=ids, max_model_len=self.max_model_len)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        if req.tokens and max(req.tokens) >= self.vocab_size:
            raise errors.InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False))

    async def generate(self, req: GenerateRequest) -> tuple[GenerateChunk, AsyncGenerator[GenerateChunk, None]]:
        """Validate, admit, and produce the first chunk; then the rest (worker/pipeline.py). Errors before the first
        chunk raise (the caller answers with JSON): 400, 429 queue full, 503 engine not running (the drain gate
        answers 503 while draining)."""
        prepared = await self.pipeline.prepare(req)
        started = await self.pipeline.start(prepared, self._generator())
        self.prefixes.served(req.prefix_hashes)
        return started


class _NdjsonStream(StreamingResponse):
    """A generation as NDJSON. However the response ends (finished, client gone, cancelled) the generation is
    closed, which aborts it in the engine."""

    def __init__(self, first: GenerateChunk, rest: AsyncGenerator[GenerateChunk, None]) -> None:
        super().__init__(self._lines(first, rest), media_type="application/x-ndjson")
        self._rest = rest

    @staticmethod
    async def _lines(first: GenerateChunk, rest: AsyncGenerator[GenerateChunk, None]) -> AsyncIterator[bytes]:
        yield first.to_line()
        async for chunk in rest:
            yield chunk.to_line()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._rest.aclose()


def _runner(
    engine: Engine | EmbeddingEngine | ScoringEngine,
    max_queued: int,
    on_step: Callable[[float, EngineStats], None],
) -> AsyncEngine | EmbeddingRunner | ScoringRunner:
    """The thread that drives the engine: a batch of generations (`on_step` after each step), of embedding
    inputs, or of pairs to score."""
    if isinstance(engine, EmbeddingEngine):
        return EmbeddingRunner(engine, max_queued=max_queued)
    if isinstance(engine, ScoringEngine):
        return ScoringRunner(engine, max_queued=max_queued)
    return AsyncEngine(engine, max_queued=max_queued, on_step=on_step)


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)


class WorkerState(TypedDict):
    """The lifespan state every request sees as `request.state`."""

    worker: Worker


def create_app(
    settings: WorkerSettings,
    *,
    load: Loader = load_model,
    drain: Drain | None = None,
    http_client: httpx.AsyncClient | None = None,
) -> FastAPI:
    """The worker app. `load` builds the engine and tokenizer (off the event loop, in the lifespan); `drain` is
    the one the process runner awaits on SIGTERM (lmfleet.server); `http_client` (tests, or a shared pool) is
    used as given and not closed."""
    drain = drain or Drain(settings.drain_timeout_s)
    registry = new_registry()
    metrics = WorkerMetrics(registry, settings.names[0])

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[WorkerState]:
        logger.info("loading %s (engine %s)", settings.model_path, settings.engine)
        started = time.monotonic()
        loaded = await asyncio.to_thread(load, settings)
        load_s = time.monotonic() - started
        engine_name = loaded.engine_name or type(loaded.engine).__name__
        metrics.load_seconds.labels(settings.names[0], engine_name).set(load_s)
        logger.info("loaded %s in %.1fs (peak RSS %.0f MB)", loaded.description or engine_name, load_s, peak_rss_mb())
        runner = _runner(loaded.engine, settings.max_queued, metrics.on_step)
        runner.start()
        worker = Worker(settings, runner, loaded.tokenizer, drain, engine_name=engine_name)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(runner.stop)
            metrics.stats = runner.stats
            http = http_client if http_client is not None else await stack.enter_async_context(make_http_client())
            controllers = [
                ControllerClient(http, a, secret=settings.registration_secret) for a in settings.controller_addresses
            ]
            membership = Registration(
                controllers,
                settings.worker_address,
                status=worker.status,
                serving=lambda: worker.serving,
                interval_s=settings.heartbeat_interval_s,
                early=worker.prefixes.news,
            )
            stack.push_async_callback(membership.leave)
            drain.on_start(membership.leave)
            membership.start()
            logger.info("worker for %s ready at %s", settings.names, settings.worker_address)
            yield {"worker": worker}

    app = docs.fastapi_app(title="lmfleet model worker", lifespan=lifespan)  # /docs served offline
    app.router.route_class = ParsedBodyRoute
    errors.install_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)  # 413; 400 for a body that is not sane JSON
    app.add_middleware(DrainGate, drain=drain, exempt=DRAIN_EXEMPT)  # 503 once draining
    install_metrics(app, registry, part="lmfleet_worker")  # GET /metrics; counts every request
    app.add_middleware(RequestIdMiddleware)  # outermost: the API server's X-Request-ID names the request here too

    secret = BearerSecrets([settings.registration_secret] if settings.registration_secret else [])

    def require_secret(request: Request) -> None:
        """With a fleet secret configured, only callers holding it (the API servers) may generate."""
        if secret and not secret.match(request.headers.get("authorization")):
            raise errors.AuthenticationFailed(
                "this worker requires the fleet secret: send 'Authorization: Bearer <secret>'"
            )

    @app.post("/worker/generate", dependencies=[Depends(require_secret)])
    async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
        first, rest = await request.state.worker.generate(body)
        return _NdjsonStream(first, rest)

    @app.post("/worker/embed", dependencies=[Depends(require_secret)])
    async def embed_route(body: EmbedRequest, request: Request) -> EmbedResponse:
        return await request.state.worker.embed(body)

    @app.post("/worker/score", dependencies=[Depends(require_secret)])
    async def score_route(body: ScorePairsRequest, request: Request) -> ScorePairsResponse:
        return await request.state.worker.score(body)

    @app.post("/worker/tokenize", dependencies=[Depends(require_secret)])
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        return request.state.worker.tokenize(body)

    @app.post("/worker/detokenize", dependencies=[Depends(require_secret)])
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        return request.state.worker.detokenize(body)

    @app.get("/worker/status")
    async def status(request: Request) -> WorkerStatus:
        return request.state.worker.status()

    fastchat.add_routes(app, dependencies=[Depends(require_secret)])  # FastChat's worker protocol

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> dict[str, str]:
        worker: Worker = request.state.worker
        if drain.draining:
            raise errors.ServiceUnavailable("worker is draining")
        if not worker.runner.ready:
            raise errors.ServiceUnavailable("engine is not running")
        return {"status": "ready"}

    return app
