"""The pooling runners: the inputs of concurrent requests go through one forward together, within the engine's
limits, each request gets its own vectors (or, for a cross-encoder, scores) back in order, and failures, capacity
and shutdown are answered."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmfleet.engine.base import EngineRejected, Rejection, TokenPair
from lmfleet.engine.pooling import EmbeddingRunner, ScoringRunner

pytestmark = pytest.mark.timeout(30)


class FakeEmbedder:
    """A vector per sequence that says which sequence it was: [first id, length]. The first forward waits for
    `release`, so requests pile up behind it; `fail` makes forwards raise."""

    max_model_len = 64
    vocab_size = 1000
    dimensions = 2
    matryoshka_dimensions = None

    def __init__(self, max_num_seqs: int = 8, max_batch_tokens: int = 1000) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.release = threading.Event()
        self.started = threading.Event()
        self.forwards: list[list[list[int]]] = []
        self.fail = False

    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        self.started.set()
        self.release.wait(10)
        self.forwards.append(batch)
        if self.fail:
            raise RuntimeError("boom")
        return [[float(s[0]), float(len(s))] for s in batch]


async def _started(runner: EmbeddingRunner, engine: FakeEmbedder) -> asyncio.Task[list[list[float]]]:
    """A first request, stuck in the engine's first forward."""
    first = asyncio.ensure_future(runner.embed([[999]]))
    await asyncio.to_thread(engine.started.wait, 10)
    return first


async def test_concurrent_requests_share_one_forward() -> None:
    engine = FakeEmbedder()
    runner = EmbeddingRunner(engine)
    runner.start()
    try:
        first = await _started(runner, engine)
        requests = [[[i, 1], [i, 2, 3]] for i in range(1, 4)]  # three requests, two inputs each
        tasks = [asyncio.ensure_future(runner.embed(r)) for r in requests]
        await asyncio.sleep(0.05)
        assert runner.stats().waiting == 6
        engine.release.set()
        results = await asyncio.gather(*tasks)
        assert await first == [[999.0, 1.0]]
        for i, vectors in enumerate(results, start=1):
            assert vectors == [[float(i), 2.0], [float(i), 3.0]]
        assert [len(b) for b in engine.forwards] == [1, 6], "the six queued inputs ran in one forward"
        assert runner.batches[-1] == 6
    finally:
        await runner.stop()


async def test_batches_keep_to_the_engines_limits() -> None:
    engine = FakeEmbedder(max_num_seqs=4, max_batch_tokens=12)
    runner = EmbeddingRunner(engine)
    runner.start()
    try:
        first = await _started(runner, engine)
        long = asyncio.ensure_future(runner.embed([[5] * 6, [6] * 6, [7] * 6]))  # 6 tokens each: two per forward
        many = asyncio.ensure_future(runner.embed([[8]] * 6))
        await asyncio.sleep(0.05)
        engine.release.set()
        assert await long == [[5.0, 6.0], [6.0, 6.0], [7.0, 6.0]]
        assert await many == [[8.0, 1.0]] * 6
        await first
        for batch in engine.forwards:
            assert len(batch) <= 4 and max(map(len, batch)) * len(batch) <= 12
        assert sum(len(b) for b in engine.forwards) == 10
    finally:
        await runner.stop()


async def test_a_failed_forward_fails_its_requests_and_the_runner_goes_on() -> None:
    engine = FakeEmbedder()
    engine.release.set()
    runner = EmbeddingRunner(engine)
    runner.start()
    try:
        engine.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            await runner.embed([[1]])
        engine.fail = False
        assert await runner.embed([[2]]) == [[2.0, 1.0]]
        assert runner.ready
    finally:
        await runner.stop()


async def test_queue_full_cancelled_and_stopped() -> None:
    engine = FakeEmbedder()
    runner = EmbeddingRunner(engine, max_queued=3)  # the one running counts too
    runner.start()
    first = await _started(runner, engine)
    gone = asyncio.ensure_future(runner.embed([[3]]))
    waiting = asyncio.ensure_future(runner.embed([[4]]))
    await asyncio.sleep(0.05)
    with pytest.raises(EngineRejected) as full:
        await runner.embed([[5]])
    assert full.value.reason is Rejection.QUEUE_FULL
    gone.cancel()  # its caller left: its input is never run
    engine.release.set()
    assert await waiting == [[4.0, 1.0]]
    await first
    assert [4] in engine.forwards[-1] and all([3] not in b for b in engine.forwards)
    await runner.stop()
    assert not runner.ready
    with pytest.raises(EngineRejected) as stopped:
        await runner.embed([[6]])
    assert stopped.value.reason is Rejection.NOT_RUNNING


class FakeScorer:
    """A score per pair that says which pair it was: first id + length / 100. The first forward waits for
    `release`."""

    max_model_len = 64
    vocab_size = 1000

    def __init__(self, max_num_seqs: int = 8, max_batch_tokens: int = 1000) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.release = threading.Event()
        self.started = threading.Event()
        self.forwards: list[list[TokenPair]] = []

    def score(self, batch: list[TokenPair]) -> list[float]:
        self.started.set()
        self.release.wait(10)
        self.forwards.append(batch)
        return [p.ids[0] + len(p.ids) / 100 for p in batch]


def pair(first: int, length: int) -> TokenPair:
    return TokenPair([first] * length, [0] * length)


async def test_the_pairs_of_concurrent_requests_share_forwards_within_the_limits() -> None:
    engine = FakeScorer(max_num_seqs=4, max_batch_tokens=20)
    runner = ScoringRunner(engine)
    runner.start()
    try:
        first = asyncio.ensure_future(runner.score([pair(9, 1)]))
        await asyncio.to_thread(engine.started.wait, 10)
        requests = [[pair(i, 2), pair(i, 3)] for i in range(1, 4)]  # three requests, two pairs each
        tasks = [asyncio.ensure_future(runner.score(r)) for r in requests]
        await asyncio.sleep(0.05)
        assert runner.stats().waiting == 6
        engine.release.set()
        results = await asyncio.gather(*tasks)
        assert await first == [9.01]
        for i, scores in enumerate(results, start=1):
            assert scores == [i + 0.02, i + 0.03]
        assert [len(b) for b in engine.forwards] == [1, 4, 2], "queued pairs ran together, four at most"
        for batch in engine.forwards:
            assert max(len(p.ids) for p in batch) * len(batch) <= 20
    finally:
        await runner.stop()
