"""Worker chunks → one `ChoiceDelta` stream per choice: the upstream side of an answer, for every endpoint of the
answer path (lmfleet.api.answer) alike.

Owns, for one request already resolved to a model (`ModelBackend`) and translated into one `GenerateRequest` per
choice (`ChoiceSpec`):
  * opening every choice on a worker and holding its FIRST chunk before anything is sent (`open_choices`), so an
    early failure (400 context_length_exceeded, 404, 429, 503 from the worker) is a plain JSON error with the right
    status, never a 200 with an error inside;
  * failover (`ChoiceStream`): a worker that fails before its first chunk is replaced by another worker of the
    model (one that could not load the model stays in rotation for its other models: `set_aside`); one that fails
    after it (dies, errs, aborts, or goes silent past the `Timeouts`) has its generation
    resumed on another one from the token ids already received, under the same answer: no duplicate, no gap, and
    usage counts each token once. Only when no worker is left does the caller see an error. A worker that does not
    hold the model yet loads it before its first chunk (`Timeouts.load_s` more); one whose load outlasts its own
    wait (503 `model_loading`) is neither ejected nor replaced: the client is told to retry;
  * turning each worker chunk into a `ChoiceDelta`, the endpoint-neutral unit the renderers spell
    (lmfleet.api.render);
  * merging the n choice streams in arrival order (`merge`), with back-pressure towards the workers, and closing
    them (`close_all`: closing a worker's HTTP stream is how it learns to abort the sequence);
  * usage accounting (`usage_of`): each prompt once, every choice's completion tokens (and, of those, the
    reasoning's, when an answer reasoned), and the prompt tokens served from a worker's prefix cache. Usage
    describes the request as the client sent it, failover or not: a prompt's cached tokens are those of the
    attempt that first answered (the worker that sent the first chunk, after any worker that failed before its
    first chunk). A resumed attempt's worker prefills the prompt and the ids already generated again and reports
    what it found cached of both; that is failover's cost, not the client's prompt, and is not reported (as its
    re-prefilled ids are not counted again). A prompt shared by n choices counts the fewest any of them found
    cached (the prompt counts once, as computed unless every choice found it cached).

Does not own: parsing requests (lmfleet.protocol.openai), the fleet view, health and the pick of a worker
(lmfleet.api.routing, behind `WorkerPool`), the HTTP transport and each worker's protocol (lmfleet.client,
lmfleet.api.fastchat_upstream), how a delta is spelled for an endpoint (lmfleet.api.render, lmfleet.api.responses),
SSE, JSON bodies and client disconnects (lmfleet.api.answer, lmfleet.api.sse).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from lmfleet import errors
from lmfleet.api.affinity import Link, for_worker, prefix_key
from lmfleet.api.fastchat_upstream import MixedWorkerClient
from lmfleet.api.metrics import ApiMetrics, ChoiceClock
from lmfleet.api.routing import Lease
from lmfleet.protocol.openai import CompletionTokensDetails, FinishReason, PromptTokensDetails, Usage
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest, Task, TokenLogprob, ToolCallChunk

logger = logging.getLogger("lmfleet.api")

T = TypeVar("T")
MODEL_LOADING = "model_loading"  # a worker's 503 code: the model is still loading there
MODEL_LOAD_FAILED = "model_load_failed"  # a worker's 503 code: it could not load the model (its other models are fine)


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice added since its previous delta. The last delta of a choice has `finish_reason` set; a
    worker's abort or error is never a delta (it is resumed elsewhere, or raised). Later features add their fields
    here with an empty default, so neither this module's callers nor the renderers change shape."""

    index: int  # the choice's `index` in the answer
    text: str = ""  # may be empty (the worker is holding back half a UTF-8 character or a possible stop string)
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    # when asked for: one per token of `token_ids`, or of the echoed prompt (protocol.worker); None: not asked for
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCallChunk, ...] = ()  # pieces of tool calls (the first of a call has its id and name)
    stop_string: str | None = None  # last delta: the stop string that ended the choice (its finish_reason "stop")
    reasoning: str = ""  # the next piece of the model's reasoning (never in `text`); a chat answer that thinks


def joined(deltas: Sequence[ChoiceDelta]) -> ChoiceDelta:
    """One choice's deltas, in order, as one delta: the whole choice (non-streamed answers), each tool call whole."""
    first, last = deltas[0], deltas[-1]
    calls: dict[int, ToolCallChunk] = {}
    for piece in (p for d in deltas for p in d.tool_calls):
        call = calls.setdefault(piece.index, ToolCallChunk(index=piece.index))
        call.id, call.name = call.id or piece.id, call.name or piece.name
        call.arguments += piece.arguments
    return ChoiceDelta(
        index=first.index,
        text="".join(d.text for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        finish_reason=last.finish_reason,
        tool_calls=tuple(calls[i] for i in sorted(calls)),
        logprobs=None if first.logprobs is None else tuple(lp for d in deltas for lp in d.logprobs or ()),
        stop_string=last.stop_string,
    )


@dataclass(frozen=True)
class ChoiceSpec:
    index: int  # the choice's `index` in the answer
    prompt_index: int  # which prompt it continues (usage counts each prompt once)
    request: GenerateRequest


class WorkerPool(Protocol):
    """Where a choice finds its workers (lmfleet.api.routing.Router)."""

    async def acquire(
        self, model: str, exclude: Collection[str] = (), *, task: Task | None = "generate", key: Sequence[Link] = ()
    ) -> Lease | None: ...

    def eject(self, address: str, reason: str) -> None: ...

    def holds(self, model: str, address: str) -> bool:
        """Whether the worker has `model` loaded, as far as the pool knows (else it loads it first)."""
        ...

    def load_failed(self, model: str, address: str) -> None:
        """The worker could not load `model`: load it elsewhere, without taking the worker out of rotation."""
        ...


@dataclass(frozen=True)
class Timeouts:
    """How long a worker may stay silent before it counts as failed (hung, not dead). The first chunk comes after
    the worker's queue and the prompt's prefill, so it gets longer."""

    first_token_s: float = 60.0
    inter_token_s: float = 30.0
    load_s: float = 300.0  # more for the first chunk from a worker that loads the model first (it waits as long)

    def __post_init__(self) -> None:
        if not (self.first_token_s > 0 and self.inter_token_s > 0 and self.load_s > 0):
            raise ValueError("timeouts must be positive")


@dataclass(frozen=True)
class ModelBackend:
    """What every choice of one answer is generated with: the model's worker pool, the worker client, the model's
    name and the timeouts; `on_tokens(address, n)` hears of every token id relayed from a worker (the dashboard's
    tok/s, lmfleet.api.fleet)."""

    pool: WorkerPool
    workers: MixedWorkerClient  # lmfleet and FastChat workers alike (lmfleet.api.fastchat_upstream)
    model: str
    timeouts: Timeouts = Timeouts()
    on_tokens: Callable[[str, int], None] | None = None
    metrics: ApiMetrics | None = None  # token timing and failover counts (lmfleet.api.metrics)
    started: float = field(default_factory=time.monotonic)  # when the request was parsed: time to first token


def _raise_if_failed(chunk: GenerateChunk) -> None:
    """A worker reports a failure inside the stream (after its 200) with `error` or finish_reason abort/error."""
    if chunk.error is not None:
        raise errors.from_body(502, {"error": chunk.error.model_dump()})
    if chunk.finish_reason in ("abort", "error"):
        raise errors.UpstreamError(f"the worker ended the generation with finish_reason={chunk.finish_reason!r}")


async def next_worker(
    pool: WorkerPool,
    model: str,
    tried: set[str],
    failure: errors.LmfleetError | None,
    task: Task | None = "generate",
    key: Sequence[Link] = (),
) -> Lease:
    """A lease on a worker of `model` serving `task` that this request has not tried yet (added to `tried`), the
    one holding most of the prompt keyed `key` if the pool's policy says so. When none is left, `failure` (why the
    last one was given up) is raised, else the pool's own error or a 503."""
    try:
        lease = await pool.acquire(model, tried, task=task, key=key)
    except errors.LmfleetError:
        if failure is not None:
            raise failure from None
        raise
    if lease is None:
        raise failure or errors.NoWorkerAvailable(
            f"No worker for the model `{model}` is available right now; retry later.", headers={"Retry-After": "1"}
        )
    tried.add(lease.address)
    return lease


def another_worker_may_help(exc: errors.LmfleetError) -> bool:
    """A worker's failure (5xx, transport, timeout) or its being full (429) — not the client's mistake (4xx), nor a
    load that outlasted the worker's wait (503 `model_loading`: the model is still loading there; another worker
    would only start a second load, so the client is told to retry)."""
    if exc.code == MODEL_LOADING:
        return False
    return exc.status >= 500 or isinstance(exc, errors.QueueFull)


def set_aside(pool: WorkerPool, model: str, address: str, exc: errors.LmfleetError) -> None:
    """What a failure before the first chunk says about the worker: a full one (429) is healthy; one that could not
    load the model still serves its others (the model loads elsewhere); any other is ejected."""
    if isinstance(exc, errors.QueueFull):
        return
    if exc.code == MODEL_LOAD_FAILED:
        pool.load_failed(model, address)
    else:
        pool.eject(address, exc.message)


def worse(previous: errors.LmfleetError | None, exc: errors.LmfleetError) -> errors.LmfleetError:
    """The error to report when no worker is left: "at capacity, retry" (429) says the most, then the latest."""
    if isinstance(previous, errors.QueueFull) and not isinstance(exc, errors.QueueFull):
        return previous
    return exc


class ChoiceStream:
    """One choice's generation, with its first chunk in hand, on whichever worker can carry it.

    Before the first chunk a worker that fails (refused connection, 5xx, 429, no chunk within the first-token
    timeout) is left for another worker of the model. After it, a failure (broken stream, error or abort chunk,
    silence past the inter-token timeout) resumes the generation on another worker: the prompt's token ids (from
    the first chunk), every token id received, and how many characters of text were passed on go to the next
    worker, which continues under the original `max_tokens` and sends only text not yet sent (protocol.worker).
    Each worker is tried at most once per choice, and never one that cannot take the request (a FastChat worker
    cannot take a resume); a failed one is ejected from the pool. When none is left the last failure is raised, as
    it is at once when the stream cannot be resumed (a FastChat worker's chunks say nothing of the prompt's ids).
    A `keyed` choice (the first of its prompt) asks for every worker with the prompt's prefix key and tells it the
    key's last links (`prefix_hashes`), resumes included: the worker a conversation moved to holds it next turn. The
    other choices of a prompt go without, so the pool spreads them by load. Records the token counts it has seen."""

    def __init__(self, spec: ChoiceSpec, backend: ModelBackend, *, keyed: bool = True) -> None:
        self.spec = spec
        self._backend = backend
        self._stream: AsyncIterator[GenerateChunk] | None = None
        self._lease: Lease | None = None
        self._first: GenerateChunk | None = None
        self._tried: set[str] = set()
        req = spec.request
        self._key = prefix_key(backend.model, req) if keyed else ()
        self._echo_chars: int | None = None if req.echo else 0  # characters of the echoed prompt, once known
        self.prompt_token_ids: list[int] | None = list(req.prompt_token_ids) if req.prompt_token_ids else None
        self.token_ids: list[int] = []  # every id passed on, in order
        self.text_chars = 0  # characters passed on (echo included)
        self.reasoning_chars = 0  # characters of reasoning passed on
        self.tool_chars: list[int] = []  # per tool call passed on: characters of its arguments
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of the prompt tokens, those the first attempt's worker found cached (module doc)
        self.completion_tokens = 0
        self.reasoning_tokens = 0  # of the completion tokens, the reasoning's
        self.finish_reason: FinishReason | None = None
        self.resumes = 0
        self._clock = ChoiceClock(backend.metrics, backend.model, backend.started)

    @property
    def address(self) -> str | None:
        """The worker generating this choice now."""
        return self._lease.address if self._lease else None

    @classmethod
    async def open(cls, spec: ChoiceSpec, backend: ModelBackend, *, keyed: bool = True) -> ChoiceStream:
        stream = cls(spec, backend, keyed=keyed)
        try:
            await stream._start(spec.request, None)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def _start(self, request: GenerateRequest, failure: errors.LmfleetError | None) -> None:
        """Send `request` to a worker this choice has not tried and read its first chunk. `failure`: why the
        previous worker was given up, raised if no other worker takes the request."""
        backend = self._backend
        self._tried.update(backend.workers.unable(backend.model, request))  # e.g. FastChat workers, for a resume
        first_attempt = request is self.spec.request  # not a resume (module docstring: usage)
        if self._key:
            request = request.model_copy(update={"prefix_hashes": for_worker(self._key)})
        moved: errors.LmfleetError | None = None  # why the last worker of this attempt was left
        while True:
            lease = await next_worker(backend.pool, backend.model, self._tried, failure, key=self._key)
            if moved is not None:
                self._clock.retry(queue_full=isinstance(moved, errors.QueueFull))
            stream = backend.workers.generate(lease.address, request)
            wait = backend.timeouts.first_token_s
            if not backend.pool.holds(backend.model, lease.address):  # it loads the model first
                wait += backend.timeouts.load_s
            try:
                first = await _read(stream, wait)
                if first is None:
                    raise errors.UpstreamError("the worker closed the stream without sending anything")
                _raise_if_failed(first)
            except errors.LmfleetError as exc:
                await _aclose(stream)
                lease.release()
                if not another_worker_may_help(exc):
                    raise
                set_aside(backend.pool, backend.model, lease.address, exc)
                failure, moved = worse(failure, exc), exc
                continue
            except BaseException:
                await _aclose(stream)
                lease.release()
                raise
            self._stream, self._lease, self._first = stream, lease, first
            self.prompt_tokens = first.prompt_tokens  # known from the first chunk on (usage_of before any delta)
            if first_attempt:
                self.cached_tokens = min(first.cached_tokens, first.prompt_tokens)
            return

    async def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        """The choice's deltas, the peeked chunk's first, up to and including the one with `finish_reason`, across
        workers."""
        while True:
            chunk, self._first = self._first, None
            try:
                if chunk is None:
                    assert self._stream is not None
                    chunk = await _read(self._stream, self._backend.timeouts.inter_token_s)
                    if chunk is None:
                        raise errors.UpstreamError("the worker's stream ended before the generation finished")
                _raise_if_failed(chunk)
            except errors.LmfleetError as exc:
                chunk = await self._resume(exc)
            self._record(chunk)
            yield ChoiceDelta(
                index=self.spec.index,
                text=chunk.text,
                reasoning=chunk.reasoning,
                token_ids=tuple(chunk.token_ids),
                finish_reason=self.finish_reason,
                tool_calls=tuple(chunk.tool_calls),
                logprobs=tuple(chunk.logprobs or ()) if self.spec.request.logprobs is not None else None,
                stop_string=chunk.stop_string if chunk.finish_reason == "stop" else None,
            )
            if chunk.finish_reason is not None:
                return

    def _record(self, chunk: GenerateChunk) -> None:
        if self._backend.on_tokens is not None and chunk.token_ids and self.address is not None:
            self._backend.on_tokens(self.address, len(chunk.token_ids))
        self._clock.tokens(len(chunk.token_ids))
        if self._echo_chars is None:  # echo: the first chunk is the prompt's text
            self._echo_chars = len(chunk.text)
        if self.prompt_token_ids is None and chunk.prompt_token_ids:
            self.prompt_token_ids = list(chunk.prompt_token_ids)
        self.token_ids.extend(chunk.token_ids)
        self.text_chars += len(chunk.text)
        self.reasoning_chars += len(chunk.reasoning)
        for piece in chunk.tool_calls:
            self.tool_chars.extend([0] * (piece.index + 1 - len(self.tool_chars)))
            self.tool_chars[piece.index] += len(piece.arguments)
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        self.reasoning_tokens = chunk.reasoning_tokens
        self.finish_reason = cast(FinishReason | None, chunk.finish_reason)  # abort/error were raised

    async def _resume(self, failure: errors.LmfleetError) -> GenerateChunk:
        """Continue on another worker after `failure` of the current one; the new stream's first chunk."""
        failed = self.address
        if failed is not None:
            self._backend.pool.eject(failed, failure.message)
        await self.aclose()
        if self.prompt_token_ids is None:  # nothing says what the worker tokenized: start over is all we could do
            raise failure
        original = self.spec.request
        if original.max_tokens is not None and len(self.token_ids) >= original.max_tokens:
            return GenerateChunk(  # every token is in; only the final chunk was lost
                request_id=original.request_id,
                finish_reason="length",
                prompt_tokens=self.prompt_tokens,
                completion_tokens=len(self.token_ids),
                reasoning_tokens=self.reasoning_tokens,
            )
        self.resumes += 1
        self._clock.resume()
        request = original.model_copy(
            update={
                "request_id": f"{original.request_id}-r{self.resumes}",
                "prompt": None,
                "messages": None,
                "prompt_token_ids": self.prompt_token_ids,
                "resume_token_ids": list(self.token_ids),
                "resume_text_chars": max(self.text_chars - (self._echo_chars or 0), 0),
                "resume_reasoning_chars": self.reasoning_chars,
                "resume_tool_chars": list(self.tool_chars),
                "echo": False,
            }
        )
        started = time.monotonic()
        await self._start(request, failure)
        logger.info(
            "%s: resumed on %s after %d token(s) in %.2fs (%s failed: %s)",
            original.request_id,
            self.address,
            len(self.token_ids),
            time.monotonic() - started,
            failed,
            failure.message,
        )
        first, self._first = self._first, None
        assert first is not None
        return first

    async def aclose(self) -> None:
        """Close the worker's HTTP stream (the worker aborts the sequence) and release the worker. Safe to call
        more than once."""
        stream, self._stream = self._stream, None
        lease, self._lease = self._lease, None
        try:
            if stream is not None:
                await _aclose(stream)
        finally:
            if lease is not None:
                lease.release()


if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[T], timeout_s: float) -> T:
        """`awaitable` in this task, cancelled after `timeout_s` (TimeoutError). Unlike `wait_for` before 3.12 it
        never swallows a cancellation of the caller that comes as the result arrives."""
        async with asyncio.timeout(timeout_s):
            return await awaitable

else:  # pragma: no cover - Python 3.10 (merge() copes with the cancellation wait_for may swallow)
    _within = asyncio.wait_for


async def _read(stream: AsyncIterator[GenerateChunk], timeout_s: float) -> GenerateChunk | None:
    """The next chunk; None at the end of the stream. UpstreamError when the worker sends nothing for `timeout_s`
    or something that is not a chunk."""
    try:
        return await _within(anext(stream, None), timeout_s)
    except asyncio.TimeoutError:
        raise errors.UpstreamError(f"the worker sent nothing for {timeout_s:g}s") from None
    except ValueError as exc:  # a line that is not a GenerateChunk: the worker's fault, not the client's
        raise errors.UpstreamError("the worker sent a malformed chunk") from exc


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def close_all(streams: Sequence[ChoiceStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def open_choices(specs: Sequence[ChoiceSpec], backend: ModelBackend) -> list[ChoiceStream]:
    """Open every choice concurrently and wait for each first chunk (the first choice of each prompt keyed, the others
    spread by load). If any fails, close the others and raise the first error."""
    firsts = {spec.prompt_index: spec.index for spec in reversed(specs)}
    tasks = [
        asyncio.ensure_future(ChoiceStream.open(spec, backend, keyed=firsts[spec.prompt_index] == spec.index))
        for spec in specs
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        opened = await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([s for s in opened if isinstance(s, ChoiceStream)])
        raise


async def merge(streams: Sequence[ChoiceStream]) -> AsyncGenerator[ChoiceDelta, None]:
    """Deltas of all streams in arrival order. Each stream is read by its own task (so a cancelled consumer never
    interrupts a stream's cleanup half-way); the first error stops everything. Closing this generator closes every
    stream."""
    queue: asyncio.Queue[ChoiceDelta | Exception | None] = asyncio.Queue(len(streams))

    async def pump(stream: ChoiceStream) -> None:
        try:
            async with contextlib.aclosing(stream.deltas()) as deltas:
                async for delta in deltas:
                    await queue.put(delta)
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        # Stop the pumps. One may miss its cancellation (a timeout racing it) and block on the full queue, so the
        # queue is emptied and the stragglers cancelled again until every pump has ended.
        pending = set(tasks)
        while pending:
            for task in pending:
                task.cancel()
            while not queue.empty():
                queue.get_nowait()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        await close_all(streams)


def usage_of(streams: Sequence[ChoiceStream]) -> Usage:
    """Each prompt's tokens count once (n choices share a prompt), and its cached tokens as the fewest of its
    choices'; every choice's completion tokens count."""
    prompts: dict[int, int] = {}
    cached: dict[int, int] = {}
    for s in streams:
        i = s.spec.prompt_index
        prompts[i] = max(prompts.get(i, 0), s.prompt_tokens)
        cached[i] = min(cached.get(i, s.cached_tokens), s.cached_tokens)
    prompt_tokens = sum(prompts.values())
    completion_tokens = sum(s.completion_tokens for s in streams)
    reasoning_tokens = sum(s.reasoning_tokens for s in streams)
    details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens) if reasoning_tokens else None
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())),
        completion_tokens_details=details,
    )
