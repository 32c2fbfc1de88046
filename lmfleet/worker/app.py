"""The model worker's HTTP shell: one process, one model.

Owns: loading the tokenizer and the engine (in the lifespan, off the event loop), the `/worker/*` routes that
turn a `GenerateRequest` into an NDJSON stream of `GenerateChunk`s (the first one carries the prompt's token ids,
so the API server can resume the generation elsewhere; a resumed request's text starts where the client's
stopped: protocol.worker), registration + heartbeats to one or more controllers (re-registering at once when a
controller has forgotten it; leaving them while the engine is not running), readiness, and the drain.

    POST /worker/generate     GenerateRequest -> NDJSON GenerateChunks (503 while draining)
    GET  /worker/status       WorkerStatus;  POST /worker_get_status: FastChat's shape
    GET  /health              alive;  GET /ready: 200 while the engine steps and the worker is not draining

Drain (`Worker.drain`, awaited by the process runner in lmfleet.cli on the first SIGTERM): leave every controller,
answer new requests 503, let the open streams finish for up to `drain_timeout_s`; then uvicorn's graceful shutdown
closes what is left, and the API server resumes those generations on another replica.

Does not own: batching and sampling (lmfleet.engine), text handling (worker/textgen.py), OpenAI semantics
(lmfleet.api).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from lmfleet import errors
from lmfleet.client import ControllerClient, make_http_client
from lmfleet.engine.base import Engine, EngineOutput, EngineRequest, FinishReason, SamplingParams
from lmfleet.engine.runner import AsyncEngine
from lmfleet.guard import BearerSecrets, RequestGuard
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest, WorkerStatus
from lmfleet.worker import textgen

logger = logging.getLogger("lmfleet.worker")


@dataclass
class WorkerSettings:
    model_path: str
    worker_address: str  # the URL other processes reach this worker at
    model_names: list[str] | None = None  # default: [model_path] exactly as given
    controller_addresses: list[str] = field(default_factory=lambda: ["http://127.0.0.1:21001"])  # [] = no register
    dtype: str = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    max_num_seqs: int = 16
    max_batch_tokens: int = 1024
    max_queued: int = 256  # running + waiting beyond this → 429
    max_model_len: int | None = None
    heartbeat_interval_s: float = 2.0
    registration_secret: str | None = field(default=None, repr=False)  # never printed
    speed: float = 1.0
    max_request_bytes: int = 32 << 20  # a GenerateRequest body (413 beyond; lmfleet.guard)
    drain_timeout_s: float = 30.0  # on SIGTERM: how long open streams may take to finish

    @property
    def names(self) -> list[str]:
        return self.model_names or [self.model_path]


EngineFactory = Callable[[WorkerSettings], tuple[Engine, Any]]  # → (engine, tokenizer)


def load_transformers(settings: WorkerSettings) -> tuple[Engine, Any]:
    """Load the tokenizer and a TransformersEngine from a local folder or a hub id."""
    from lmfleet.engine.transformers import TransformersEngine

    tokenizer = textgen.load_tokenizer(settings.model_path)
    engine = TransformersEngine.from_pretrained(
        settings.model_path,
        dtype=settings.dtype,
        device=settings.device,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
        max_model_len=settings.max_model_len,
    )
    return engine, tokenizer


class Worker:
    """Per-process state, created in the lifespan: the running engine, the tokenizer and the controller links."""

    def __init__(
        self, settings: WorkerSettings, engine: AsyncEngine, tokenizer: Any, *, max_model_len: int, engine_name: str
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.engine_name = engine_name
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        self.draining = False
        self.open_streams = 0  # generate responses in progress (counted by _NdjsonStream)
        self.controllers: list[ControllerClient] = []
        self.registration: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        """Takes requests: the engine runs and the worker is not draining."""
        return self.engine.ready and not self.draining

    def status(self) -> WorkerStatus:
        s = self.engine.stats()
        return WorkerStatus(
            model_names=self.settings.names,
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
        ids = list(req.prompt_token_ids or [])
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise errors.InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param="prompt")
        return ids

    def engine_request(self, req: GenerateRequest, prompt: list[int]) -> EngineRequest:
        """Check lengths against the context and build the engine's request (prompt + any resumed ids)."""
        if not prompt:
            raise errors.InvalidRequest("the prompt is empty", param="prompt")
        if any(not 0 <= i < self.vocab_size for i in req.resume_token_ids):
            raise errors.InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param="resume_token_ids")
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
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
        )
        return EngineRequest(request_id=req.request_id, prompt_token_ids=context, params=params)

    async def generate(self, req: GenerateRequest) -> tuple[GenerateChunk, AsyncGenerator[GenerateChunk, None]]:
        """Validate, admit, and produce the first chunk; then the rest. Errors before the first chunk raise (the
        caller answers with JSON): 503 while draining, 400, 429 QueueFull."""
        if self.draining:
            raise errors.ServiceUnavailable("this worker is draining: send the request to another one")
        prompt = self.prompt_ids(req)
        engine_req = self.engine_request(req, prompt)
        chunks = self._chunks(req, prompt, self.engine.generate(engine_req))
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
        base = {"request_id": req.request_id, "prompt_tokens": len(prompt)}
        opening: dict[str, Any] = {"prompt_token_ids": prompt}  # on the first chunk only

        def chunk(delta: str = "", ids: list[int] | None = None, **kw: Any) -> GenerateChunk:
            nonlocal opening
            extra, opening = opening, {}
            return GenerateChunk(text=delta, token_ids=ids or [], completion_tokens=done, **base, **extra, **kw)

        try:
            out: EngineOutput | None = await anext(outputs)  # admission errors raise before anything is yielded
            if req.echo and req.prompt is not None:
                yield chunk(req.prompt)
            if text.stopped:  # the resumed ids already end in a stop string
                yield chunk(pending, finish_reason="stop")
                return
            while out is not None:
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

    def start_registration(self, controllers: list[ControllerClient]) -> None:
        self.controllers = controllers
        if controllers:
            self.registration = asyncio.create_task(_keep_registered(self, controllers), name="lmfleet-heartbeat")

    async def leave_controllers(self) -> None:
        """Stop heartbeating and unregister from every controller (concurrently; failures are only logged)."""
        if self.registration is not None:
            self.registration.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.registration
            self.registration = None
        address = self.settings.worker_address
        results = await asyncio.gather(*(c.unregister(address) for c in self.controllers), return_exceptions=True)
        for c, result in zip(self.controllers, results, strict=True):
            if isinstance(result, Exception):
                logger.warning("could not unregister from controller %s: %s", c.address, result)
        self.controllers = []

    async def drain(self, timeout_s: float) -> bool:
        """Take no new request (503), leave the controllers, and wait until no stream is open (True) or `timeout_s`
        has passed (False)."""
        if not self.draining:
            logger.info("draining: leaving the controllers, %d stream(s) open", self.open_streams)
        self.draining = True
        await self.leave_controllers()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.open_streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.open_streams:
            logger.warning("drain timeout (%gs): %d stream(s) still open", timeout_s, self.open_streams)
            return False
        logger.info("drained: no stream open")
        return True


class _NdjsonStream(StreamingResponse):
    """A generation as NDJSON. However the response ends (finished, client gone, cancelled) the generation is
    closed, which aborts it in the engine, and it stops counting as an open stream."""

    def __init__(self, worker: Worker, first: GenerateChunk, rest: AsyncGenerator[GenerateChunk, None]) -> None:
        super().__init__(self._lines(first, rest), media_type="application/x-ndjson")
        self._worker, self._rest = worker, rest
        worker.open_streams += 1

    @staticmethod
    async def _lines(first: GenerateChunk, rest: AsyncGenerator[GenerateChunk, None]) -> AsyncIterator[bytes]:
        yield first.to_line()
        async for chunk in rest:
            yield chunk.to_line()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._rest.aclose()
            finally:
                self._worker.open_streams -= 1


async def _keep_registered(worker: Worker, controllers: list[ControllerClient]) -> None:
    """Heartbeat every interval; register when a controller does not know us (first start, or it restarted).
    While the engine is not running, leave the controllers (so no traffic comes) and stop heartbeating."""
    address = worker.settings.worker_address
    known = {c.address: False for c in controllers}
    failing: set[str] = set()
    while True:
        if not worker.serving:
            for c in controllers:
                if known[c.address]:
                    logger.warning("engine is not running: leaving controller %s", c.address)
                    known[c.address] = False
                    with contextlib.suppress(errors.LmfleetError):
                        await c.unregister(address)
            await asyncio.sleep(worker.settings.heartbeat_interval_s)
            continue
        for c in controllers:
            try:
                if known[c.address]:
                    known[c.address] = await c.heartbeat(address, worker.status())
                if not known[c.address]:
                    await c.register(address, worker.status())
                    known[c.address] = True
                    logger.info("registered %s (%s) with controller %s", address, worker.settings.names, c.address)
                failing.discard(c.address)
            except errors.LmfleetError as exc:
                known[c.address] = False
                if c.address not in failing:
                    logger.warning("controller %s: %s; retrying every %.1fs", c.address, exc.message,
                                   worker.settings.heartbeat_interval_s)
                    failing.add(c.address)
        await asyncio.sleep(worker.settings.heartbeat_interval_s)


def create_app(
    settings: WorkerSettings,
    *,
    load: EngineFactory = load_transformers,
    engine_name: str = "transformers",
    http_client: httpx.AsyncClient | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine, tokenizer = await asyncio.to_thread(load, settings)
        runner = AsyncEngine(engine, max_queued=settings.max_queued)
        runner.start()
        worker = Worker(settings, runner, tokenizer, max_model_len=engine.max_model_len, engine_name=engine_name)
        app.state.worker = worker
        http = http_client or make_http_client()
        worker.start_registration(
            [ControllerClient(http, a, secret=settings.registration_secret) for a in settings.controller_addresses]
        )
        logger.info("worker for %s ready at %s", settings.names, settings.worker_address)
        try:
            yield
        finally:
            await worker.leave_controllers()
            await runner.stop()
            if http_client is None:
                await http.aclose()

    app = FastAPI(title="lmfleet model worker", lifespan=lifespan)
    errors.install_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)  # 413; 400 for a body that is not sane JSON

    def worker_of(request: Request) -> Worker:
        return request.app.state.worker

    async def drain() -> None:
        """Called once by the process runner (lmfleet.cli) on SIGTERM, before uvicorn's graceful shutdown."""
        worker = getattr(app.state, "worker", None)
        if worker is not None:
            await worker.drain(settings.drain_timeout_s)

    app.state.drain = drain

    secret = BearerSecrets([settings.registration_secret] if settings.registration_secret else [])

    def require_secret(request: Request) -> None:
        """With a fleet secret configured, only callers holding it (the API servers) may generate."""
        if secret and not secret.match(request.headers.get("authorization")):
            raise errors.AuthenticationFailed(
                "this worker requires the fleet secret: send 'Authorization: Bearer <secret>'"
            )

    @app.post("/worker/generate", dependencies=[Depends(require_secret)])
    async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
        worker = worker_of(request)
        first, rest = await worker.generate(body)
        return _NdjsonStream(worker, first, rest)

    @app.get("/worker/status")
    async def status(request: Request) -> WorkerStatus:
        return worker_of(request).status()

    @app.post("/worker_get_status")  # FastChat's route and shape
    async def fastchat_status(request: Request) -> dict[str, Any]:
        s = worker_of(request).status()
        return {"model_names": s.model_names, "speed": s.speed, "queue_length": s.queue_length}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> dict[str, str]:
        worker = worker_of(request)
        if worker.draining:
            raise errors.ServiceUnavailable("worker is draining")
        if not worker.engine.ready:
            raise errors.ServiceUnavailable("engine is not running")
        return {"status": "ready"}

    return app
