"""The model worker's HTTP shell: one process, one model.

Owns: loading the model through its engine's loader (lmfleet.engine.registry; in the lifespan, off the event
loop), the one check that a request fits the model, the `/worker/*` routes that turn a `GenerateRequest` into an
NDJSON stream of `GenerateChunk`s (the first one carries the prompt's token ids, so the API server can resume the
generation elsewhere; a resumed request's text starts where the client's stopped: protocol.worker), mapping an
engine's refusal (`Rejection`) to the public error, and readiness.

    POST /worker/generate     GenerateRequest -> NDJSON GenerateChunks (503 while draining)
    POST /worker/embed        EmbedRequest -> EmbedResponse (an embedding model's worker; worker/embed.py)
    POST /worker/tokenize     TokenizeRequest -> TokenizeResponse;  POST /worker/detokenize: the reverse
    GET  /worker/status       WorkerStatus;  POST /worker_get_status: FastChat's shape
    GET  /health              alive;  GET /ready: 200 while the engine steps and the worker is not draining
    GET  /metrics             Prometheus: load, KV cache, steps, requests (lmfleet.worker.metrics), open like status

Drain (lmfleet.drain, awaited by the process runner on the first SIGTERM): leave every controller
(worker/registration.py), answer new requests 503, let the open streams finish for up to `drain_timeout_s`; then
uvicorn's graceful shutdown closes what is left, and the API server resumes those generations on another replica.

Structured output and tools: the worker picks a request's grammar (JSON for `json_schema`, a call for a forced tool
choice), compiles it in a thread (lmfleet.engine.grammar), advances it through resumed ids and hands it to the engine
on `SamplingParams.constraint`; tool prompts, tool-call parsing and call grammars are worker/tools.py's.

Does not own: batching and sampling (lmfleet.engine), text handling (worker/textgen.py), fleet membership
(worker/registration.py), OpenAI semantics (lmfleet.api).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import resource
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from pathlib import PurePath
from typing import Any, TypedDict

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
    EngineOutput,
    EngineRejected,
    EngineRequest,
    EngineStats,
    FinishReason,
    LoadedModel,
    Rejection,
    SamplingParams,
    Tokenizer,
    TokenLogprob,
)
from lmfleet.engine.grammar import Constraint, GrammarError, Grammars
from lmfleet.engine.pooling import EmbeddingRunner
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
    TokenizeRequest,
    TokenizeResponse,
    ToolCallChunk,
    WorkerStatus,
)
from lmfleet.requestid import RequestIdMiddleware
from lmfleet.worker import embed, textgen, tools
from lmfleet.worker.metrics import WorkerMetrics
from lmfleet.worker.registration import Registration

logger = logging.getLogger("lmfleet.worker")

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
    heartbeat_interval_s: float = 2.0
    registration_secret: str | None = field(default=None, repr=False)  # never printed
    speed: float = 1.0
    max_request_bytes: int = 32 << 20  # a GenerateRequest body (413 beyond; lmfleet.guard)
    drain_timeout_s: float = DEFAULT_TIMEOUT_S  # on SIGTERM: how long open streams may take to finish
    tool_parser: str = tools.AUTO  # a key of lmfleet.worker.tools.FORMATS, or "auto" (from the chat template)

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


_REJECTIONS: dict[Rejection, Callable[[str], errors.LmfleetError]] = {
    Rejection.QUEUE_FULL: lambda detail: errors.QueueFull(detail),
    Rejection.NOT_RUNNING: lambda detail: errors.ServiceUnavailable(detail),
    Rejection.DUPLICATE_ID: lambda detail: errors.InvalidRequest(detail, param="request_id"),
    Rejection.UNSUPPORTED: lambda detail: errors.InvalidRequest(detail),
}


class Worker:
    """Per-process state, created in the lifespan: the running engine, its tokenizer, the drain and the fleet
    membership."""

    def __init__(
        self,
        settings: WorkerSettings,
        runner: AsyncEngine | EmbeddingRunner,
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
        self.grammars = Grammars(tokenizer)
        template = tokenizer.chat_template
        self.native_tools = tools.takes_tools(template)  # else the generic tool prompt (Hermes)
        self.tool_format = tools.detect(template if self.native_tools else None, settings.tool_parser)
        self.speller = textgen.LogprobSpeller(tokenizer)

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
            context_length=self.max_model_len,
            engine=self.engine_name,
            tasks=["embed"] if isinstance(self.runner, EmbeddingRunner) else ["generate"],
        )

    def _generator(self) -> AsyncEngine:
        if not isinstance(self.runner, AsyncEngine):
            raise errors.InvalidRequest(
                "this model computes embeddings only; use /v1/embeddings, not chat or text completions", param="model"
            )
        return self.runner

    async def embed(self, req: EmbedRequest) -> EmbedResponse:
        """Vectors for every input: 400 for a generation model, an input that does not fit, a `dimensions` the
        model does not allow; 429 / 503 as for generation."""
        runner = self.runner
        if not isinstance(runner, EmbeddingRunner):
            raise errors.InvalidRequest(
                "this model generates text and does not compute embeddings; use an embedding model", param="model"
            )
        embed.check_dimensions(req.dimensions, runner.engine)
        seqs = embed.token_ids(req, self.tokenizer, runner.engine, self.vocab_size)
        try:
            vectors = await runner.embed(seqs)
        except EngineRejected as exc:
            raise _REJECTIONS[exc.reason](exc.detail) from None
        except RuntimeError as exc:
            raise errors.UpstreamError(str(exc)) from None
        return EmbedResponse(embeddings=embed.shorten(vectors, req.dimensions), prompt_tokens=sum(map(len, seqs)))

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            ids = textgen.render_chat(self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(tokens=ids, max_model_len=self.max_model_len)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        if req.tokens and max(req.tokens) >= self.vocab_size:
            raise errors.InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens, skip_special_tokens=False))

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            if not req.messages:
                raise errors.InvalidRequest("messages must not be empty", param="messages")
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            offered = req.tools if req.tool_choice != "none" else []
            messages, specs = tools.prepare(messages, offered, native=self.native_tools)
            return textgen.render_chat(
                self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt, tools=specs
            )
        if req.prompt is not None:
            return textgen.encode_prompt(self.tokenizer, req.prompt)
        return list(req.prompt_token_ids or [])

    def constraint(self, req: GenerateRequest) -> Constraint | None:
        """The grammar the output must follow, if any (JSON output, a forced tool call), advanced through the
        resumed ids. Compiling takes a while: call it in a thread. InvalidRequest naming the parameter whose schema
        llguidance cannot compile."""
        if req.json_schema is not None:
            schema, strict = req.json_schema or {}, req.json_schema_strict
            param, build = "response_format", lambda: self.grammars.json_schema(schema, strict=strict)
        elif req.tool_choice == "required" and req.tools:
            forced = [t for t in req.tools if req.tool_name in (None, t.name)]
            grammar = self.tool_format.grammar(forced, parallel=req.parallel_tool_calls and req.tool_name is None)
            param, build = "tools", lambda: self.grammars.lark(grammar)
        else:
            return None
        try:
            constraint = self.grammars.constraint(build())
        except GrammarError as exc:
            raise errors.InvalidRequest(f"this schema cannot be enforced: {exc}", param=param) from None
        if not constraint.advance_all(list(req.resume_token_ids)):
            raise errors.InvalidRequest("the resumed ids do not follow the output grammar", param="resume_token_ids")
        return constraint

    def engine_request(self, req: GenerateRequest, prompt: list[int]) -> EngineRequest:
        """The one check that a request fits the model (a prompt, ids inside the vocabulary, prompt + resumed ids +
        max_tokens within the context), then the engine's request (prompt + any resumed ids)."""
        if not prompt:
            raise errors.InvalidRequest("the prompt is empty", param="prompt")
        for name, ids in (("prompt", prompt), ("resume_token_ids", req.resume_token_ids)):
            if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
                raise errors.InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param=name)
        if any(not 0 <= t < self.vocab_size for t in req.logit_bias):
            raise errors.InvalidRequest(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")
        context = prompt + list(req.resume_token_ids)
        room = self.max_model_len - len(context)
        wanted = (req.max_tokens - len(req.resume_token_ids)) if req.max_tokens is not None else room
        if room < 1 or wanted > room:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + (req.max_tokens or 1)} tokens ({len(prompt)} in the messages, "
                f"{req.max_tokens or 1} in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens" if req.max_tokens is not None and room >= 1 else "messages",
            )
        params = SamplingParams(
            max_new_tokens=max(wanted, 1),
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=tuple(sorted(req.logit_bias.items())),
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
        )
        return EngineRequest(request_id=req.request_id, prompt_token_ids=context, params=params)

    async def generate(self, req: GenerateRequest) -> tuple[GenerateChunk, AsyncGenerator[GenerateChunk, None]]:
        """Validate, admit, and produce the first chunk; then the rest. Errors before the first chunk raise (the
        caller answers with JSON): 400, 429 queue full, 503 engine not running (the drain gate answers 503 while
        draining)."""
        prompt = self.prompt_ids(req)
        engine_req = self.engine_request(req, prompt)
        constraint = await asyncio.to_thread(self.constraint, req)  # after the fit check: compiling takes a while
        if constraint is not None:
            engine_req.params = dataclasses.replace(engine_req.params, constraint=constraint)
        chunks = self._chunks(req, prompt, self._generator().generate(engine_req))
        try:
            first = await anext(chunks)  # the engine's first output: QueueFull / ContextLengthExceeded raise here
        except BaseException:
            await chunks.aclose()
            raise
        return first, chunks

    async def _chunks(
        self, req: GenerateRequest, prompt: list[int], outputs: AsyncGenerator[EngineOutput, None]
    ) -> AsyncGenerator[GenerateChunk, None]:
        resumed = list(req.resume_token_ids)
        calls = None  # tool calls are parsed out of the text (and never sent as text) when tools are offered
        if req.tools and req.tool_choice != "none":
            skip = req.resume_text_chars or 0
            calls = tools.CallStream(
                self.tool_format,
                names=[t.name for t in req.tools],
                single=not req.parallel_tool_calls,
                skip_content=skip,
                skip_calls=req.resume_tool_chars,
            )
        if req.resume_text_chars is None:  # resumed ids are context only: their text is not sent
            text = textgen.TextStream(self.tokenizer, prompt + resumed, req.stop, special=calls is not None)
            pending = ""
        else:  # decode them again; send only what the client has not got yet
            text = textgen.TextStream(self.tokenizer, prompt, req.stop, special=calls is not None)
            pending = text.resume(resumed, 0 if calls is not None else req.resume_text_chars)
        done = len(resumed)
        logprobs: list[TokenLogprob] = []  # the engine's, for the ids of the chunk being made
        base: dict[str, Any] = {"request_id": req.request_id, "prompt_tokens": len(prompt)}
        opening: dict[str, Any] = {"prompt_token_ids": prompt}  # on the first chunk only

        def chunk(delta: str = "", ids: list[int] | None = None, **kw: Any) -> GenerateChunk:
            nonlocal opening
            extra, opening = opening, {}
            pieces: list[ToolCallChunk] = []
            if calls is not None:
                delta, pieces = calls.push(delta)
                if kw.get("finish_reason") is not None:
                    rest, more = calls.finish()
                    delta, pieces = delta + rest, pieces + more
                    if calls.calls and kw["finish_reason"] == "stop":
                        kw["finish_reason"] = "tool_calls"
            if req.logprobs is not None and "logprobs" not in kw:  # asked for: one entry per id
                kw["logprobs"] = self.speller.entries(logprobs[: len(ids or [])])
            return GenerateChunk(
                text=delta, tool_calls=pieces, token_ids=ids or [], completion_tokens=done, **base, **extra, **kw
            )

        try:
            try:
                out: EngineOutput | None = await anext(outputs)  # admission errors raise before anything is yielded
            except EngineRejected as exc:
                raise _REJECTIONS[exc.reason](exc.detail) from None
            if req.echo:  # the prompt's text as given, or its ids' text
                echoed = out.prompt_logprobs if out is not None and req.logprobs is not None else None
                text_of_prompt = req.prompt if req.prompt is not None else self.tokenizer.decode(prompt)
                yield chunk(text_of_prompt, logprobs=self.speller.prompt_entries(prompt, echoed) if echoed else None)
            if text.stopped:  # the resumed ids already end in a stop string
                yield chunk(pending, finish_reason="stop")
                return
            while out is not None:
                logprobs = out.logprobs or []
                piece, used = text.push_counted(out.new_token_ids)
                ids = out.new_token_ids[:used]  # a stop string may end the completion inside a merged output
                done += used
                delta, pending = pending + piece, ""
                if text.stopped:
                    yield chunk(delta, ids, finish_reason="stop")
                    return  # closing `outputs` in finally aborts the sequence in the engine
                if out.finish_reason is FinishReason.ERROR:
                    err = errors.UpstreamError(f"generation failed: {out.error or 'engine error'}")
                    yield chunk(delta, ids, finish_reason="error", error=err.body()["error"])
                    return
                if out.finished:
                    delta += text.finish()
                    reason = "stop" if text.stopped else out.finish_reason.value  # type: ignore[union-attr]
                    yield chunk(delta, ids, finish_reason=reason)
                    return
                yield chunk(delta, ids)
                out = await anext(outputs, None)
            err = errors.UpstreamError("engine ended the stream early")
            yield chunk(finish_reason="error", error=err.body()["error"])
        finally:
            await outputs.aclose()


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
    engine: Engine | EmbeddingEngine, max_queued: int, on_step: Callable[[float, EngineStats], None]
) -> AsyncEngine | EmbeddingRunner:
    """The thread that drives the engine: a batch of generations (`on_step` after each step), or of embedding
    inputs."""
    if isinstance(engine, EmbeddingEngine):
        return EmbeddingRunner(engine, max_queued=max_queued)
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

    @app.post("/worker/tokenize", dependencies=[Depends(require_secret)])
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        return request.state.worker.tokenize(body)

    @app.post("/worker/detokenize", dependencies=[Depends(require_secret)])
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        return request.state.worker.detokenize(body)

    @app.get("/worker/status")
    async def status(request: Request) -> WorkerStatus:
        return request.state.worker.status()

    @app.post("/worker_get_status")  # FastChat's route and shape
    async def fastchat_status(request: Request) -> dict[str, Any]:
        s = request.state.worker.status()
        return {"model_names": s.model_names, "speed": s.speed, "queue_length": s.queue_length}

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
