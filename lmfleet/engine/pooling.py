"""The bridge between a single-threaded `EmbeddingEngine` and asyncio: the inputs of concurrent requests batched
into one forward.

Owns: the embedding thread (it alone calls `engine.embed`), the queue of requests' inputs, the batch (inputs taken
in arrival order, across requests, up to the engine's `max_num_seqs` and `max_batch_tokens`; a request with more
inputs than one batch holds spreads over several), the admission limit (`Rejection.QUEUE_FULL`) and the failure
policy (a failed forward fails the requests in it; after `_MAX_CONSECUTIVE_FAILURES` in a row the runner stops and
`ready` turns False). A request whose caller has gone (its future cancelled) loses the inputs not yet run.
Does not own: pooling (the engine), text, HTTP. Imports no torch.

    event loop thread                                  embedding thread
    -----------------                                  ----------------
    embed(seqs) ── queue.append(job) ──────────────▶   take inputs of the queued jobs → engine.embed(batch)
        ◀── loop.call_soon_threadsafe(set_result) ───  a job whose inputs are all done
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from lmfleet.engine.base import EmbeddingEngine, EngineRejected, EngineStats, Rejection
from lmfleet.engine.runner import DEFAULT_MAX_QUEUED, EngineThread

logger = logging.getLogger("lmfleet.engine")

_MAX_CONSECUTIVE_FAILURES = 3


@dataclass(eq=False)
class _Job:
    seqs: list[list[int]]
    future: asyncio.Future[list[list[float]]]
    loop: asyncio.AbstractEventLoop
    vectors: list[list[float] | None] = field(default_factory=list)
    next: int = 0  # the first input not yet taken into a batch
    done: int = 0

    def settle(self, result: list[list[float]] | BaseException) -> None:
        """From the embedding thread: hand the result (or the failure) to the caller's loop."""

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


class EmbeddingRunner(EngineThread):
    """Runs an `EmbeddingEngine` on a daemon thread. `start()` once; `await embed(seqs)` from an event loop;
    `await stop()` (or `close()`) at shutdown."""

    thread_name = "lmfleet-embed"

    def __init__(self, engine: EmbeddingEngine, *, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        super().__init__(max_queued)
        self.engine = engine
        self._jobs: deque[_Job] = deque()  # guarded by _cond, as is:
        self._open = 0  # requests admitted whose caller is still waiting
        self._running = (0, 0)  # (inputs, tokens) in the forward now running
        self.batches: list[int] = []  # inputs per forward, most recent last (bounded; tests and logs read it)

    def stats(self) -> EngineStats:
        inputs, tokens = self._running
        with self._cond:
            queued = sum(len(j.seqs) - j.next for j in self._jobs)
        return EngineStats(running=inputs, waiting=queued, tokens_in_flight=tokens)

    async def embed(self, seqs: list[list[int]]) -> list[list[float]]:
        """A vector per sequence, in order. The sequences fit the engine (the worker checked). Raises
        `EngineRejected`: QUEUE_FULL when `max_queued` requests are in flight, NOT_RUNNING when the runner has stopped
        or failed; the engine's failure as RuntimeError."""
        if not self.ready:
            raise self._not_running()
        loop = asyncio.get_running_loop()
        job = _Job(seqs, loop.create_future(), loop, [None] * len(seqs))
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

    # -- the embedding thread ------------------------------------------------------------------------------------

    def _take(self) -> list[tuple[_Job, int]]:
        """The next batch, under the lock: inputs in arrival order while they fit the engine's limits."""
        batch: list[tuple[_Job, int]] = []
        width = 0
        for job in list(self._jobs):
            if job.future.cancelled():
                self._jobs.remove(job)
                continue
            while job.next < len(job.seqs) and len(batch) < self.engine.max_num_seqs:
                wider = max(width, len(job.seqs[job.next]))
                if batch and wider * (len(batch) + 1) > self.engine.max_batch_tokens:
                    return batch
                batch.append((job, job.next))
                job.next += 1
                width = wider
            if job.next == len(job.seqs):
                self._jobs.remove(job)
            if len(batch) >= self.engine.max_num_seqs:
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
            seqs = [job.seqs[i] for job, i in batch]
            self._running = (len(seqs), sum(len(s) for s in seqs))
            try:
                vectors = self.engine.embed(seqs)
            except Exception as exc:
                failures += 1
                logger.exception("embedding forward failed (%d in a row)", failures)
                self._fail({job for job, _ in batch}, RuntimeError(f"embedding failed: {type(exc).__name__}: {exc}"))
                if failures >= _MAX_CONSECUTIVE_FAILURES:
                    self._failed = f"{failures} embedding forwards failed in a row; last: {type(exc).__name__}: {exc}"
                    break
                continue
            finally:
                self._running = (0, 0)
            failures = 0
            self.batches = [*self.batches[-99:], len(seqs)]
            for (job, i), vector in zip(batch, vectors, strict=True):
                job.vectors[i] = vector
                job.done += 1
                if job.done == len(job.seqs):
                    job.settle([v for v in job.vectors if v is not None])
        with self._cond:
            self._stopping = True
            left, self._jobs = set(self._jobs), deque()
        self._fail(left, EngineRejected(Rejection.NOT_RUNNING, self._failed or "the engine was stopped"))

    def _fail(self, jobs: set[_Job], exc: BaseException) -> None:
        with self._cond:
            for job in jobs:
                if job in self._jobs:
                    self._jobs.remove(job)
        for job in jobs:
            job.settle(exc)
