"""AsyncEngine over an in-memory fake engine: merging for slow readers, aborts, admission, failures, shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from lmfleet.engine.base import (
    EngineOutput,
    EngineRejected,
    EngineRequest,
    EngineStats,
    FinishReason,
    Rejection,
    SamplingParams,
)
from lmfleet.engine.runner import AsyncEngine

pytestmark = pytest.mark.timeout(30)  # a bug here shows up as a hang


class FakeEngine:
    """Request `r` produces tokens 100, 101, ... one per step until max_new_tokens. Touched by one thread only.

    `gated`: each step waits for a permit from `allow(n)`. `fail_steps`: that many steps raise (once at least
    `fail_from` requests are running) before it recovers.
    """

    max_model_len = 100_000
    eos_token_ids = (0,)

    def __init__(self, *, gated: bool = False, fail_steps: int = 0, fail_from: int = 0) -> None:
        self.running: dict[str, list] = {}
        self.pending_aborts: set[str] = set()
        self.aborted: list[str] = []
        self.fail_steps = fail_steps
        self.fail_from = fail_from
        self.steps = 0
        self.idle_checks = 0
        self._permits = threading.Semaphore(0) if gated else None
        self.aborted_event = threading.Event()
        self.idle = threading.Event()  # set when the engine thread finds nothing left to do

    def allow(self, n: int) -> None:
        assert self._permits is not None
        for _ in range(n):
            self._permits.release()

    def add_request(self, request: EngineRequest) -> None:
        if request.params.temperature > 1.5:
            raise EngineRejected(Rejection.UNSUPPORTED, "too hot")
        self.running[request.request_id] = [request, 0]

    def abort_request(self, request_id: str) -> None:
        if request_id in self.running:
            self.pending_aborts.add(request_id)
            self.aborted.append(request_id)
            self.aborted_event.set()

    def step(self) -> list[EngineOutput]:
        self.steps += 1
        if self._permits is not None:
            assert self._permits.acquire(timeout=10), "test forgot to allow a step"
        if self.fail_steps and len(self.running) >= self.fail_from:
            self.fail_steps -= 1
            raise RuntimeError("kaput")
        outs = []
        for rid in sorted(self.pending_aborts):
            del self.running[rid]
            outs.append(EngineOutput(rid, [], FinishReason.ABORT))
        self.pending_aborts.clear()
        for rid, state in list(self.running.items()):
            request, n = state
            state[1] = n + 1
            if n + 1 >= request.params.max_new_tokens:
                del self.running[rid]
                outs.append(EngineOutput(rid, [100 + n], FinishReason.LENGTH))
            else:
                outs.append(EngineOutput(rid, [100 + n]))
        return outs

    def has_unfinished_requests(self) -> bool:
        self.idle_checks += 1
        busy = bool(self.running)
        if busy:
            self.idle.clear()
        else:
            self.idle.set()
        return busy

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, sum(len(r.prompt_token_ids) + n for r, n in self.running.values()))


def req(rid: str, max_new_tokens: int = 5, prompt: list[int] | None = None, temperature: float = 1.0) -> EngineRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    return EngineRequest(rid, [1, 2, 3] if prompt is None else prompt, params)


@asynccontextmanager
async def running(engine: FakeEngine, **kw) -> AsyncIterator[AsyncEngine]:
    runner = AsyncEngine(engine, **kw)
    runner.start()
    try:
        yield runner
    finally:
        await runner.stop()


async def collect(runner: AsyncEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in runner.generate(request)]


async def wait_idle(engine: FakeEngine) -> None:
    """Until the engine thread has delivered everything and gone to sleep (deliveries run before we resume)."""
    await asyncio.to_thread(engine.idle.wait, 10)


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


async def test_streams_every_request_to_its_end():
    engine = FakeEngine()
    async with running(engine) as runner:
        results = await asyncio.gather(*(collect(runner, req(str(i), max_new_tokens=3 + i)) for i in range(8)))
    for i, outs in enumerate(results):
        assert tokens(outs) == [100 + k for k in range(3 + i)]
        assert outs[-1].finish_reason == FinishReason.LENGTH
        assert all(o.finish_reason is None for o in outs[:-1])


async def test_slow_reader_gets_one_merged_output():
    engine = FakeEngine(gated=True)
    async with running(engine) as runner:
        gen = runner.generate(req("a", max_new_tokens=10))
        engine.allow(1)
        first = await anext(gen)
        assert first.new_token_ids == [100] and not first.finished
        engine.allow(9)  # the engine runs 9 steps while nobody reads
        await wait_idle(engine)
        merged = await anext(gen)
        assert merged.new_token_ids == list(range(101, 110))
        assert merged.finish_reason == FinishReason.LENGTH
        with pytest.raises(StopAsyncIteration):
            await anext(gen)


async def test_closing_the_generator_aborts_the_request():
    engine = FakeEngine()
    async with running(engine) as runner:
        gen = runner.generate(req("a", max_new_tokens=10_000))
        await anext(gen)
        await gen.aclose()
        assert await asyncio.to_thread(engine.aborted_event.wait, 10)
        await wait_idle(engine)
        assert engine.aborted == ["a"] and not engine.running
        assert runner.stats().running == 0 and runner.stats().waiting == 0


async def test_cancelling_the_reader_aborts_the_request():
    engine = FakeEngine()
    async with running(engine) as runner:
        got_one = asyncio.Event()

        async def read() -> None:
            async for _ in runner.generate(req("a", max_new_tokens=10_000)):
                got_one.set()

        task = asyncio.create_task(read())
        await got_one.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(engine.aborted_event.wait, 10)
        await wait_idle(engine)
        assert engine.aborted == ["a"]


async def test_queue_full_at_once_and_room_again_after():
    engine = FakeEngine(gated=True)
    async with running(engine, max_queued=2) as runner:
        gens = [runner.generate(req(str(i), max_new_tokens=1)) for i in range(2)]
        tasks = [asyncio.create_task(anext(g)) for g in gens]
        await asyncio.sleep(0)  # both generators registered before their first await
        with pytest.raises(EngineRejected) as info:
            await anext(runner.generate(req("x")))
        assert info.value.reason is Rejection.QUEUE_FULL
        assert runner.stats().running + runner.stats().waiting == 2
        engine.allow(2)  # permits left over are harmless
        assert [(await t).finish_reason for t in tasks] == [FinishReason.LENGTH] * 2
        for g in gens:
            await g.aclose()
        engine.allow(1)
        assert tokens(await collect(runner, req("y", max_new_tokens=1))) == [100]


async def test_rejections_raise_before_any_output():
    engine = FakeEngine()
    async with running(engine) as runner:
        with pytest.raises(EngineRejected, match="too hot") as info:  # raised by the engine on its thread
            await anext(runner.generate(req("hot", temperature=2.0)))
        assert info.value.reason is Rejection.UNSUPPORTED
        assert runner.stats().waiting == 0
        assert tokens(await collect(runner, req("ok", max_new_tokens=2))) == [100, 101]


async def test_duplicate_request_id_is_rejected():
    engine = FakeEngine(gated=True)
    async with running(engine) as runner:
        task = asyncio.create_task(collect(runner, req("a", max_new_tokens=1)))
        await asyncio.sleep(0)
        with pytest.raises(EngineRejected) as info:
            await anext(runner.generate(req("a")))
        assert info.value.reason is Rejection.DUPLICATE_ID
        engine.allow(1)
        assert tokens(await task) == [100]


async def test_a_failing_step_errors_its_requests_and_serving_goes_on():
    engine = FakeEngine(fail_steps=1, fail_from=2)
    async with running(engine) as runner:
        outs = await asyncio.gather(collect(runner, req("a", 10_000)), collect(runner, req("b", 10_000)))
        for o in outs:
            assert o[-1].finish_reason == FinishReason.ERROR and "kaput" in (o[-1].error or "")
        assert sorted(engine.aborted) == ["a", "b"]  # freed in the engine too
        assert runner.ready
        assert tokens(await collect(runner, req("c", max_new_tokens=2))) == [100, 101]


async def test_an_engine_that_keeps_failing_fails_everything_and_is_not_ready():
    engine = FakeEngine(fail_steps=1000)
    async with running(engine) as runner:
        outs = await collect(runner, req("a"))
        assert outs[-1].finish_reason == FinishReason.ERROR
        # the aborted request keeps the engine busy, its steps keep failing: the third failure in a row is final
        for _ in range(1000):
            if not runner.ready:
                break
            await asyncio.sleep(0.01)
        assert not runner.ready
        with pytest.raises(EngineRejected, match="not running|shutting down"):
            await anext(runner.generate(req("c")))


async def test_stop_fails_pending_requests():
    engine = FakeEngine()
    runner = AsyncEngine(engine)
    runner.start()
    gen = runner.generate(req("a", max_new_tokens=10_000))
    await anext(gen)
    await runner.stop()
    rest = [o async for o in gen]
    assert rest[-1].finish_reason == FinishReason.ERROR and "stopped" in (rest[-1].error or "")
    assert not runner.ready
    with pytest.raises(EngineRejected, match="not running|shutting down"):
        await anext(runner.generate(req("b")))


async def test_not_started_is_not_ready():
    runner = AsyncEngine(FakeEngine())
    assert not runner.ready
    with pytest.raises(EngineRejected, match="not running|shutting down"):
        await anext(runner.generate(req("a")))


async def test_idle_thread_sleeps_instead_of_polling():
    engine = FakeEngine()
    async with running(engine) as runner:
        await collect(runner, req("a", max_new_tokens=3))
        await wait_idle(engine)
        steps, checks = engine.steps, engine.idle_checks
        await asyncio.sleep(0.05)
        assert (engine.steps, engine.idle_checks) == (steps, checks)  # asleep on its condition, not spinning
        assert tokens(await collect(runner, req("b", max_new_tokens=2))) == [100, 101]  # and wakes up for work


async def test_stats_count_the_inbox_as_waiting():
    engine = FakeEngine(gated=True)
    async with running(engine) as runner:
        assert runner.stats() == EngineStats(0, 0, 0)
        tasks = [asyncio.create_task(collect(runner, req(str(i), max_new_tokens=2))) for i in range(3)]
        await asyncio.sleep(0)
        assert runner.stats().running + runner.stats().waiting == 3
        engine.allow(10)
        await asyncio.gather(*tasks)
        await wait_idle(engine)
        assert runner.stats() == EngineStats(0, 0, 0)


def test_the_runner_imports_no_torch():
    code = "import sys, lmfleet.engine, lmfleet.engine.runner; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_a_late_abort_never_ends_a_later_request_that_took_the_same_id() -> None:
    """A reader that stops early (a stop string matched above the engine) closes its stream only later; by then the
    engine may have finished that request and a new one may hold its id. The late abort is for the old stream."""
    engine = FakeEngine(gated=True)
    async with running(engine) as runner:
        old = runner.generate(req("x", max_new_tokens=2))
        engine.allow(1)
        first = await anext(old)  # the reader takes one output, then stops reading without closing
        assert first.new_token_ids == [100] and not first.finished
        engine.allow(1)  # the engine finishes "x" on its own; its id is free again
        for _ in range(500):
            if "x" not in runner._in_flight:
                break
            await asyncio.sleep(0.01)
        new = runner.generate(req("x", max_new_tokens=3))
        engine.allow(1)
        assert (await anext(new)).new_token_ids == [100]
        await old.aclose()  # the old stream's abort arrives now
        engine.allow(2)
        rest = [out async for out in new]
    assert [t for out in rest for t in out.new_token_ids] == [101, 102]
    assert rest[-1].finish_reason == FinishReason.LENGTH and engine.aborted == []
