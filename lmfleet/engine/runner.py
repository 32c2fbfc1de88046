"""The one bridge between a single-threaded `Engine` and asyncio.

Owns: `EngineThread`, the lifecycle of an engine's thread (start, stop, ready, failed) that the embedding runner
(lmfleet.engine.pooling) shares; and `AsyncEngine`: the engine thread (it alone calls `add_request`,
`abort_request`, `step`), a thread-safe inbox of adds and aborts drained before every step, one collector per
request, the admission limit (`Rejection.QUEUE_FULL`) and the failure policy. Does not own: the engine's
scheduling, text, HTTP. Imports no torch.

    event loop thread                                  engine thread
    -----------------                                  -------------
    generate(req) ── inbox.append(("add", ...)) ──▶    drain inbox → engine.add_request / abort_request
        │                                              engine.step() → outputs
        ◀── loop.call_soon_threadsafe(deliver) ──────  (one call per step per event loop)
    collector.get(): merged outputs since the last read

The engine never waits on a reader: a collector merges the outputs a slow reader has not taken yet into one
(vLLM's `RequestOutputCollector`). A consumer that stops iterating (generator closed, task cancelled) aborts its
request; the row is freed at the next step. If `step()` raises, every request in the engine gets a final ERROR
output and the thread carries on; after `_MAX_CONSECUTIVE_FAILURES` failed steps in a row it gives up, fails
everything and `ready` turns False.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from lmfleet.engine.base import (
    Engine,
    EngineOutput,
    EngineRejected,
    EngineRequest,
    EngineStats,
    FinishReason,
    Rejection,
)

logger = logging.getLogger("lmfleet.engine")

_MAX_CONSECUTIVE_FAILURES = 3
DEFAULT_MAX_QUEUED = 256  # requests running + waiting before new ones are refused (QUEUE_FULL)


class _Collector:
    """Outputs of one request not yet read, merged into one. Lives on (and is touched only from) one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: EngineOutput | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._ready = asyncio.Event()

    def put(self, out: EngineOutput) -> None:
        if self._finished:
            return
        self._finished = out.finished
        if self._pending is None:
            self._pending = dataclasses.replace(
                out,
                new_token_ids=list(out.new_token_ids),
                logprobs=list(out.logprobs) if out.logprobs is not None else None,
            )
        else:
            pending = self._pending
            pending.new_token_ids.extend(out.new_token_ids)
            pending.finish_reason = out.finish_reason
            pending.error = out.error
            if out.logprobs is not None:
                pending.logprobs = (pending.logprobs or []) + out.logprobs
            pending.prompt_logprobs = pending.prompt_logprobs or out.prompt_logprobs
        self._ready.set()

    def put_error(self, exc: BaseException) -> None:
        if not self._finished:
            self._finished = True
            self._error = exc
            self._ready.set()

    async def get(self) -> EngineOutput:
        while self._pending is None:
            if self._error is not None:
                raise self._error
            self._ready.clear()
            await self._ready.wait()
        out, self._pending = self._pending, None
        return out


def _deliver(items: list[tuple[_Collector, EngineOutput | BaseException]]) -> None:
    """Runs on a collector's event loop."""
    for collector, item in items:
        if isinstance(item, BaseException):
            collector.put_error(item)
        else:
            collector.put(item)


class EngineThread:
    """The lifecycle every engine runner shares: one daemon thread running `_run`, a condition guarding what the
    event loop hands it, and the stop and failure flags. `start()` once, from anywhere; `await stop()` (or
    `close()`) at shutdown."""

    thread_name = "lmfleet-engine"

    def __init__(self, max_queued: int) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be positive")
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._stopping = False  # guarded by _cond
        self._failed: str | None = None  # written by the engine thread only
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current step; every request still pending gets a final ERROR output."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    async def stop(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None and not self._stopping

    def _not_running(self) -> EngineRejected:
        return EngineRejected(
            Rejection.NOT_RUNNING, f"engine is not running{': ' + self._failed if self._failed else ''}"
        )


class AsyncEngine(EngineThread):
    """Runs an `Engine` on a daemon thread and serves `generate()` to asyncio code.

    `start()` once, from anywhere; `generate()` from an event loop; `await stop()` (or `close()`) at shutdown.
    `on_step(seconds, stats)` runs on the engine thread after every step that ran (the worker's metrics); a failure
    in it is logged, never the engine's.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        on_step: Callable[[float, EngineStats], None] | None = None,
    ) -> None:
        super().__init__(max_queued)
        self.engine = engine
        self._on_step = on_step
        # Guarded by _cond: the inbox, the ids admitted and not yet finished.
        self._inbox: deque[tuple[str, Any, _Collector | None]] = deque()
        self._in_flight: set[str] = set()
        # Written by the engine thread only; read anywhere (single reference assignments).
        self._snapshot = engine.stats()  # before the thread starts: the engine is still ours
        # Engine thread only.
        self._live: dict[str, _Collector] = {}

    def stats(self) -> EngineStats:
        """Running and cached counts as of the last step; `waiting` also counts requests still in the inbox."""
        snap = self._snapshot
        with self._cond:
            in_flight = len(self._in_flight)
        return dataclasses.replace(snap, waiting=max(0, in_flight - snap.running))

    # -- the event-loop side ------------------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Yield this request's outputs (merged when the reader is slow) until one has `finish_reason` set.

        Raises `EngineRejected` before the first output: QUEUE_FULL when `max_queued` requests are already in
        flight, DUPLICATE_ID, NOT_RUNNING when the engine is not running, or the engine's own refusal. The request
        fits the model (lmfleet.engine.base): the worker checked. Closing the generator early aborts the request.
        """
        if not self.ready:
            raise self._not_running()
        rid = request.request_id
        collector = _Collector(asyncio.get_running_loop())
        with self._cond:
            if self._stopping:  # checked under the lock the thread drains the inbox under when it exits
                raise EngineRejected(Rejection.NOT_RUNNING, "engine is shutting down")
            if rid in self._in_flight:
                raise EngineRejected(Rejection.DUPLICATE_ID, f"request id {rid!r} is already in use")
            if len(self._in_flight) >= self.max_queued:
                raise EngineRejected(Rejection.QUEUE_FULL, "server is at capacity, retry later")
            self._in_flight.add(rid)
            self._inbox.append(("add", request, collector))
            self._cond.notify()
        finished = False
        try:
            while not finished:
                out = await collector.get()
                finished = out.finished
                yield out
        except EngineRejected:
            finished = True  # rejected by the engine: nothing to abort
            raise
        finally:
            if not finished:
                self._abort(rid, collector)

    def _abort(self, request_id: str, collector: _Collector) -> None:
        """Abort this stream's request. The stream is named too: an abort that arrives after its request finished
        must not end a later request that took the same id."""
        with self._cond:
            self._inbox.append(("abort", request_id, collector))
            self._cond.notify()

    # -- the engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping or engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, deque()
                self._drain(inbox)
                if not engine.has_unfinished_requests():
                    self._snapshot = engine.stats()
                    continue
                started = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception as exc:
                    failures += 1
                    logger.exception("engine step failed (%d in a row)", failures)
                    self._fail_live(f"engine step failed: {type(exc).__name__}: {exc}", abort=True)
                    if failures >= _MAX_CONSECUTIVE_FAILURES:
                        self._failed = f"{failures} engine steps failed in a row; last: {type(exc).__name__}: {exc}"
                        break
                    continue
                failures = 0
                self._dispatch(outputs)
                self._snapshot = engine.stats()
                if self._on_step is not None:
                    try:
                        self._on_step(time.perf_counter() - started, self._snapshot)
                    except Exception:
                        logger.exception("on_step failed")
        except Exception as exc:  # the loop itself broke (has_unfinished_requests / stats raised)
            logger.exception("engine thread failed")
            self._failed = f"engine thread failed: {type(exc).__name__}: {exc}"
        finally:
            reason = self._failed or "the engine was stopped"
            with self._cond:
                self._stopping = True
                inbox, self._inbox = self._inbox, deque()
            for kind, request, collector in inbox:
                if kind == "add":
                    assert collector is not None
                    self._live[request.request_id] = collector
            self._fail_live(reason, abort=False)

    def _drain(self, inbox: deque[tuple[str, Any, _Collector | None]]) -> None:
        for kind, payload, collector in inbox:
            if kind == "add":
                assert collector is not None
                rid = payload.request_id
                try:
                    self.engine.add_request(payload)
                except Exception as exc:  # an assertion (a bug upstream) fails only this request
                    err = exc if isinstance(exc, EngineRejected) else EngineRejected(Rejection.UNSUPPORTED, repr(exc))
                    if not isinstance(exc, EngineRejected):
                        logger.exception("add_request(%r) failed", rid)
                    self._release(rid)
                    self._send([(collector, err)])
                else:
                    self._live[rid] = collector
            elif collector is not None and self._live.get(payload) is collector:
                self.engine.abort_request(payload)

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        items: list[tuple[_Collector, EngineOutput | BaseException]] = []
        for out in outputs:
            collector = self._live.get(out.request_id)
            if collector is None:
                continue
            items.append((collector, out))
            if out.finished:
                del self._live[out.request_id]
                self._release(out.request_id)
        self._send(items)

    def _fail_live(self, message: str, *, abort: bool) -> None:
        """Give every live request a final ERROR output (and, if asked, abort it in the engine)."""
        live, self._live = self._live, {}
        items: list[tuple[_Collector, EngineOutput | BaseException]] = []
        for rid, collector in live.items():
            items.append((collector, EngineOutput(rid, [], FinishReason.ERROR, message)))
            self._release(rid)
            if abort:
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    logger.exception("abort_request(%r) failed", rid)
        self._send(items)

    def _release(self, request_id: str) -> None:
        with self._cond:
            self._in_flight.discard(request_id)

    def _send(self, items: list[tuple[_Collector, EngineOutput | BaseException]]) -> None:
        """Hand items to their event loops: one `call_soon_threadsafe` per loop. A request whose loop has closed has
        nobody left to read it: it is aborted."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Collector, EngineOutput | BaseException]]] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed
                for _, output in batch:
                    if isinstance(output, EngineOutput) and not output.finished and output.request_id in self._live:
                        del self._live[output.request_id]
                        self._release(output.request_id)
                        self.engine.abort_request(output.request_id)
