"""The bridge between a single-threaded pooling engine and asyncio: the inputs of concurrent requests batched into
one forward. `EmbeddingRunner` serves an `EmbeddingEngine` (a vector per sequence), `ScoringRunner` a
`ScoringEngine` (a cross-encoder: a score per pair); both are the one runner below with a different forward.

Owns: the pooling thread (it alone calls the engine's forward), the queue of requests' inputs, the batch (inputs
taken in arrival order, across requests, up to the engine's `max_num_seqs` and `max_batch_tokens`; a request with
more inputs than one batch holds spreads over several), the admission limit (`Rejection.QUEUE_FULL`) and the
failure policy (a failed forward fails the requests in it; after `_MAX_CONSECUTIVE_FAILURES` in a row the runner
stops and `ready` turns False). A request whose caller has gone (its future cancelled) loses the inputs not yet run.
Does not own: pooling and scoring (the engine), text, HTTP. Imports no torch.

    event loop thread                                  pooling thread
    -----------------                                  --------------
    embed(seqs) / score(pairs) ── queue.append(job) ─▶ take inputs of the queued jobs → one forward over them
        ◀── loop.call_soon_threadsafe(set_result) ───  a job whose inputs are all done
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from lmfleet.engine.base import EmbeddingEngine, EngineRejected, EngineStats, Rejection, ScoringEngine, TokenPair
from lmfleet.engine.runner import DEFAULT_MAX_QUEUED, EngineThread

logger = logging.getLogger("lmfleet.engine")

_MAX_CONSECUTIVE_FAILURES = 3

In = TypeVar("In")  # one input: a sequence's ids, or a pair's
Out = TypeVar("Out")  # what the forward gives for it: a vector, or a score


class _Limits(Protocol):
    @property
    def max_num_seqs(self) -> int: ...

    @property
    def max_batch_tokens(self) -> int: ...


@dataclass(eq=False)
class _Job(Generic[In, Out]):
    items: list[In]
    future: asyncio.Future[list[Out]]
    loop: asyncio.AbstractEventLoop
    results: list[Out | None] = field(default_factory=list)
    next: int = 0  # the first input not yet taken into a batch
    done: int = 0

    def settle(self, result: list[Out] | BaseException) -> None:
        """From the pooling thread: hand the result (or the failure) to the caller's loop."""

        def put() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # that loop is closed: nobody is waiting
            pass


class _PoolingRunner(EngineThread, Generic[In, Out]):
    """Runs one forward (`forward`: a batch of inputs in, one result per input out) on a daemon thread, within
    `limits` (the engine's), `width(input)` being an input's length in tokens."""

    kind = "pooling"  # for the log and the failure message

    def __init__(
        self,
        forward: Callable[[list[In]], list[Out]],
        limits: _Limits,
        width: Callable[[In], int],
        max_queued: int,
    ) -> None:
        super().__init__(max_queued)
        self._forward = forward
        self._limits = limits
        self._width = width
        self._jobs: deque[_Job[In, Out]] = deque()  # guarded by _cond, as is:
        self._open = 0  # requests admitted whose caller is still waiting
        self._running = (0, 0)  # (inputs, tokens) in the forward now running
        self.batches: list[int] = []  # inputs per forward, most recent last (bounded; tests and logs read it)

    def stats(self) -> EngineStats:
        inputs, tokens = self._running
        with self._cond:
            queued = sum(len(j.items) - j.next for j in self._jobs)
        return EngineStats(running=inputs, waiting=queued, tokens_in_flight=tokens)

    async def _submit(self, items: list[In]) -> list[Out]:
        """A result per input, in order. The inputs fit the engine (the worker checked). Raises `EngineRejected`:
        QUEUE_FULL when `max_queued` requests are in flight, NOT_RUNNING when the runner has stopped or failed; the
        engine's failure as RuntimeError."""
        if not self.ready:
            raise self._not_running()
        loop = asyncio.get_running_loop()
        job: _Job[In, Out] = _Job(items, loop.create_future(), loop, [None] * len(items))
        with self._cond:
            if self._stopping:
                raise EngineRejected(Rejection.NOT_RUNNING, "engine is shutting down")
            if self._open >= self.max_queued:
                raise EngineRejected(Rejection.QUEUE_FULL, "server is at capacity, retry later")
            self._open += 1
            self._jobs.append(job)
            self._cond.notify()
        try:
            return await job.future  # cancelled: the thread drops the job's inputs not yet run
        finally:
            with self._cond:
                self._open -= 1

    # -- the pooling thread --------------------------------------------------------------------------------------

    def _take(self) -> list[tuple[_Job[In, Out], int]]:
        """The next batch, under the lock: inputs in arrival order while they fit the engine's limits."""
        batch: list[tuple[_Job[In, Out], int]] = []
        width = 0
        most, budget = self._limits.max_num_seqs, self._limits.max_batch_tokens
        for job in list(self._jobs):
            if job.future.cancelled():
                self._jobs.remove(job)
                continue
            while job.next < len(job.items) and len(batch) < most:
                wider = max(width, self._width(job.items[job.next]))
                if batch and wider * (len(batch) + 1) > budget:
                    return batch
                batch.append((job, job.next))
                job.next += 1
                width = wider
            if job.next == len(job.items):
                self._jobs.remove(job)
            if len(batch) >= most:
                break
        return batch

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not (self._jobs or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                batch = self._take()
            if not batch:
                continue
            items = [job.items[i] for job, i in batch]
            self._running = (len(items), sum(map(self._width, items)))
            try:
                results = self._forward(items)
            except Exception as exc:
                failures += 1
                logger.exception("%s forward failed (%d in a row)", self.kind, failures)
                self._fail({job for job, _ in batch}, RuntimeError(f"{self.kind} failed: {type(exc).__name__}: {exc}"))
                if failures >= _MAX_CONSECUTIVE_FAILURES:
                    self._failed = f"{failures} {self.kind} forwards failed in a row; last: {type(exc).__name__}: {exc}"
                    break
                continue
            finally:
                self._running = (0, 0)
            failures = 0
            self.batches = [*self.batches[-99:], len(items)]
            for (job, i), result in zip(batch, results, strict=True):
                job.results[i] = result
                job.done += 1
                if job.done == len(job.items):
                    job.settle([r for r in job.results if r is not None])
        with self._cond:
            self._stopping = True
            left, self._jobs = set(self._jobs), deque()
        self._fail(left, EngineRejected(Rejection.NOT_RUNNING, self._failed or "the engine was stopped"))

    def _fail(self, jobs: set[_Job[In, Out]], exc: BaseException) -> None:
        with self._cond:
            for job in jobs:
                if job in self._jobs:
                    self._jobs.remove(job)
        for job in jobs:
            job.settle(exc)


class EmbeddingRunner(_PoolingRunner[list[int], list[float]]):
    """Runs an `EmbeddingEngine` on a daemon thread. `start()` once; `await embed(seqs)` from an event loop;
    `await stop()` (or `close()`) at shutdown."""

    thread_name = "lmfleet-embed"
    kind = "embedding"

    def __init__(self, engine: EmbeddingEngine, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        super().__init__(engine.embed, engine, len, max_queued)
        self.engine = engine

    async def embed(self, seqs: list[list[int]]) -> list[list[float]]:
        """A vector per sequence, in order (`EngineRejected` and RuntimeError as `_submit` says)."""
        return await self._submit(seqs)


class ScoringRunner(_PoolingRunner[TokenPair, float]):
    """Runs a `ScoringEngine` (a cross-encoder) on a daemon thread. `start()` once; `await score(pairs)` from an
    event loop; `await stop()` (or `close()`) at shutdown."""

    thread_name = "lmfleet-score"
    kind = "scoring"

    def __init__(self, engine: ScoringEngine, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        super().__init__(engine.score, engine, _pair_width, max_queued)
        self.engine = engine

    async def score(self, pairs: list[TokenPair]) -> list[float]:
        """A score per pair, in order (`EngineRejected` and RuntimeError as `_submit` says)."""
        return await self._submit(pairs)


def _pair_width(pair: TokenPair) -> int:
    return len(pair.ids)
