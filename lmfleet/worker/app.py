"""The model worker's HTTP shell: one process, one model.

Owns: loading the tokenizer and the engine (in the lifespan, off the event loop), the `/worker/*` routes that
turn a `GenerateRequest` into an NDJSON stream of `GenerateChunk`s, and registration + heartbeats to one or
more controllers (re-registering at once when a controller has forgotten it). Does not own: batching and
sampling (lmfleet.engine), text handling (worker/textgen.py), OpenAI semantics (lmfleet.api).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from lmfleet import errors
from lmfleet.client import ControllerClient, make_http_client
from lmfleet.engine.base import Engine, EngineOutput, EngineRequest, FinishReason, SamplingParams
from lmfleet.engine.runner import AsyncEngine
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
    max_batch_tokens: int = 2048
    max_queued: int = 256  # running + waiting beyond this → 429
    max_model_len: int | None = None
    heartbeat_interval_s: float = 2.0
    registration_secret: str | None = None
    speed: float = 1.0

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

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Validate, admit, and stream. Errors before the first chunk raise (the caller answers with JSON)."""
        prompt = self.prompt_ids(req)
        engine_req = self.engine_request(req, prompt)
        outputs = self.engine.generate(engine_req)
        try:
            first = await anext(outputs)  # raises QueueFull / ContextLengthExceeded before any byte is sent
        except BaseException:
            await outputs.aclose()
            raise
        return self._chunks(req, prompt, first, outputs)

    async def _chunks(
        self, req: GenerateRequest, prompt: list[int], first: EngineOutput, outputs: AsyncIterator[EngineOutput]
    ) -> AsyncIterator[GenerateChunk]:
        text = textgen.TextStream(self.tokenizer, prompt + list(req.resume_token_ids), req.stop)
        done = len(req.resume_token_ids)
        base = {"request_id": req.request_id, "prompt_tokens": len(prompt)}
        if req.echo and req.prompt is not None:
            yield GenerateChunk(text=req.prompt, completion_tokens=done, **base)
        out: EngineOutput | None = first
        try:
            while out is not None:
                done += len(out.new_token_ids)
                delta = text.push(out.new_token_ids)
                if text.stopped:
                    yield GenerateChunk(text=delta, token_ids=out.new_token_ids, finish_reason="stop",
                                        completion_tokens=done, **base)
                    return  # closing `outputs` in finally aborts the sequence in the engine
                if out.finish_reason is FinishReason.ERROR:
                    err = errors.UpstreamError(f"generation failed: {out.error or 'engine error'}")
                    yield GenerateChunk(text=delta, token_ids=out.new_token_ids, finish_reason="error",
                                        completion_tokens=done, error=err.body()["error"], **base)
                    return
                if out.finished:
                    delta += text.finish()
                    reason = "stop" if text.stopped else out.finish_reason.value  # type: ignore[union-attr]
                    yield GenerateChunk(text=delta, token_ids=out.new_token_ids, finish_reason=reason,
                                        completion_tokens=done, **base)
                    return
                yield GenerateChunk(text=delta, token_ids=out.new_token_ids, completion_tokens=done, **base)
                out = await anext(outputs, None)
            yield GenerateChunk(finish_reason="error", completion_tokens=done,
                                error=errors.UpstreamError("engine ended the stream early").body()["error"], **base)
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]


async def _ndjson(chunks: AsyncIterator[GenerateChunk]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk.to_line()
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def _keep_registered(worker: Worker, controllers: list[ControllerClient]) -> None:
    """Heartbeat every interval; register when a controller does not know us (first start, or it restarted)."""
    address = worker.settings.worker_address
    known = {c.address: False for c in controllers}
    failing: set[str] = set()
    while True:
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
        controllers = [
            ControllerClient(http, a, secret=settings.registration_secret) for a in settings.controller_addresses
        ]
        beat = asyncio.create_task(_keep_registered(worker, controllers)) if controllers else None
        logger.info("worker for %s ready at %s", settings.names, settings.worker_address)
        try:
            yield
        finally:
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
            for c in controllers:
                with contextlib.suppress(errors.LmfleetError):
                    await c.unregister(settings.worker_address)
            await runner.stop()
            if http_client is None:
                await http.aclose()

    app = FastAPI(title="lmfleet model worker", lifespan=lifespan)
    errors.install_handlers(app)

    def worker_of(request: Request) -> Worker:
        return request.app.state.worker

    @app.post("/worker/generate")
    async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
        chunks = await worker_of(request).generate(body)
        return StreamingResponse(_ndjson(chunks), media_type="application/x-ndjson")

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
        if not worker_of(request).engine.ready:
            raise errors.ServiceUnavailable("engine is not running")
        return {"status": "ready"}

    return app
