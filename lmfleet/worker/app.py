"""The model worker's HTTP shell: one process, one model.

Owns: loading the model through its engine's loader (lmfleet.engine.registry; in the lifespan, off the event
loop), the one check that a request fits the model, the `/worker/*` routes that turn a `GenerateRequest` into an
NDJSON stream of `GenerateChunk`s (the first one carries the prompt's token ids, so the API server can resume the
generation elsewhere; a resumed request's text starts where the client's stopped: protocol.worker), mapping an
engine's refusal (`Rejection`) to the public error, and readiness.

    POST /worker/generate     GenerateRequest -> NDJSON GenerateChunks (503 while draining)
    GET  /worker/status       WorkerStatus;  POST /worker_get_status: FastChat's shape
    GET  /health              alive;  GET /ready: 200 while the engine steps and the worker is not draining

Drain (lmfleet.drain, awaited by the process runner on the first SIGTERM): leave every controller
(worker/registration.py), answer new requests 503, let the open streams finish for up to `drain_timeout_s`; then
uvicorn's graceful shutdown closes what is left, and the API server resumes those generations on another replica.

Does not own: batching and sampling (lmfleet.engine), text handling (worker/textgen.py), fleet membership
(worker/registration.py), OpenAI semantics (lmfleet.api).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from pathlib import PurePath
from typing import Any, TypedDict

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from lmfleet import errors
from lmfleet.client import DEFAULT_CONTROLLER, ControllerClient, make_http_client
from lmfleet.drain import DEFAULT_EXEMPT, DEFAULT_TIMEOUT_S, Drain, DrainGate
from lmfleet.engine import registry
from lmfleet.engine.base import (
    BatchSettings,
    EngineOutput,
    EngineRejected,
    EngineRequest,
    FinishReason,
    LoadedModel,
    Rejection,
    SamplingParams,
    Tokenizer,
    TokenLogprob,
)
from lmfleet.engine.runner import DEFAULT_MAX_QUEUED, AsyncEngine
from lmfleet.guard import BearerSecrets, ParsedBodyRoute, RequestGuard
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest, WorkerStatus
from lmfleet.worker import textgen
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
        self, settings: WorkerSettings, runner: AsyncEngine, tokenizer: Tokenizer, drain: Drain, engine_name: str
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.tokenizer = tokenizer
        self.drain = drain
        self.engine_name = engine_name
        self.max_model_len = runner.engine.max_model_len
        self.vocab_size = min(runner.engine.vocab_size, len(tokenizer))  # ids both can handle
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
            context_length=self.max_model_len,
            engine=self.engine_name,
        )

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            if not req.messages:
                raise errors.InvalidRequest("messages must not be empty", param="messages")
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            return textgen.render_chat(self.tokenizer, messages, add_generation_prompt=req.add_generation_prompt)
        if req.prompt is not None:
            return textgen.encode_prompt(self.tokenizer, req.prompt)
        return list(req.prompt_token_ids or [])

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
        chunks = self._chunks(req, prompt, self.runner.generate(engine_req))
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
        if req.resume_text_chars is None:  # resumed ids are context only: their text is not sent
            text = textgen.TextStream(self.tokenizer, prompt + resumed, req.stop)
            pending = ""
        else:  # decode them again; send only what the client has not got yet
            text = textgen.TextStream(self.tokenizer, prompt, req.stop)
            pending = text.resume(resumed, req.resume_text_chars)
        done = len(resumed)
        logprobs: list[TokenLogprob] = []  # the engine's, for the ids of the chunk being made
        base: dict[str, Any] = {"request_id": req.request_id, "prompt_tokens": len(prompt)}
        opening: dict[str, Any] = {"prompt_token_ids": prompt}  # on the first chunk only

        def chunk(delta: str = "", ids: list[int] | None = None, **kw: Any) -> GenerateChunk:
            nonlocal opening
            extra, opening = opening, {}
            if req.logprobs is not None and "logprobs" not in kw:  # asked for: one entry per id
                kw["logprobs"] = self.speller.entries(logprobs[: len(ids or [])])
            return GenerateChunk(text=delta, token_ids=ids or [], completion_tokens=done, **base, **extra, **kw)

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

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[WorkerState]:
        loaded = await asyncio.to_thread(load, settings)
        if loaded.description:
            logger.info("loaded %s", loaded.description)
        runner = AsyncEngine(loaded.engine, max_queued=settings.max_queued)
        runner.start()
        worker = Worker(
            settings, runner, loaded.tokenizer, drain, engine_name=loaded.engine_name or type(loaded.engine).__name__
        )
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(runner.stop)
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

    app = FastAPI(title="lmfleet model worker", lifespan=lifespan)
    app.router.route_class = ParsedBodyRoute
    errors.install_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)  # 413; 400 for a body that is not sane JSON
    app.add_middleware(DrainGate, drain=drain, exempt=DRAIN_EXEMPT)  # outermost: 503 once draining

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
