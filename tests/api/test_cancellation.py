"""A client that goes away stops the work it asked for: the API server closes the worker streams (which is how a
worker learns to abort the sequence). Uses transports that really stream and really disconnect (fakes.py)."""

from __future__ import annotations

import asyncio
import json

from .fakes import Fleet, serve, sse_events

MESSAGES = [{"role": "user", "content": "tell me a long story"}]


async def test_stream_client_disconnect_closes_worker_stream() -> None:
    fleet = Fleet()
    fleet.all_workers(then="hang")  # one chunk, then nothing until the client goes away
    async with serve(fleet) as api, api.streaming() as client:
        body = {"model": "echo", "messages": MESSAGES, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["choices"][0]["delta"]["role"] == "assistant"
                    break
        # leaving the block closed the connection; the transport waited for the API server to finish
        (req,) = fleet.workers["a"].requests
        assert fleet.workers["a"].cancelled == [req.request_id]


async def test_non_stream_client_disconnect_closes_worker_streams() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.all_workers(then="hang")
    async with serve(fleet) as api, api.streaming() as client:
        body = {"model": "echo", "messages": MESSAGES, "n": 2}
        call = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        await asyncio.gather(*(w.hanging.wait() for w in fleet.workers.values()))
        call.cancel()  # the client gives up while the answer is being collected
        await asyncio.gather(call, return_exceptions=True)
        for worker in fleet.workers.values():
            (req,) = worker.requests
            assert worker.cancelled == [req.request_id]


async def test_client_leaving_before_the_first_chunk_closes_worker_stream() -> None:
    """A long prefill or a queue: the worker has not sent anything yet when the client gives up."""
    fleet = Fleet()
    fleet.all_workers(then="stall")
    async with serve(fleet) as api, api.streaming() as client:
        for stream in (False, True):
            body = {"model": "echo", "messages": MESSAGES, "stream": stream}
            call = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            await fleet.workers["a"].hanging.wait()
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            assert fleet.workers["a"].cancelled == [r.request_id for r in fleet.workers["a"].requests]
            fleet.workers["a"].hanging.clear()


async def test_one_choice_failing_closes_the_others() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.workers["a"].then = "hang"
    fleet.workers["b"].then = "error_chunk"
    fleet.workers["b"].resumable = False  # its failure is final: nothing to resume the choice from
    async with serve(fleet) as api:
        resp = await api.raw.post(
            "/v1/chat/completions", json={"model": "echo", "messages": MESSAGES, "n": 2, "stream": True}
        )
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        (req,) = fleet.workers["a"].requests
        assert fleet.workers["a"].cancelled == [req.request_id]


async def test_early_failure_of_one_choice_closes_the_opened_ones() -> None:
    fleet = Fleet({"echo": ["a", "b"]})
    fleet.workers["a"].then = "hang"
    fleet.workers["b"].reject = (400, {"error": {"message": "bad", "type": "invalid_request_error"}})
    fleet.workers["b"].wait_for = fleet.workers["a"].hanging  # b refuses once a has started streaming
    async with serve(fleet) as api:
        resp = await api.raw.post("/v1/chat/completions", json={"model": "echo", "messages": MESSAGES, "n": 2})
        assert resp.status_code == 400
        (req,) = fleet.workers["a"].requests
        assert fleet.workers["a"].cancelled == [req.request_id]


async def test_closing_the_merge_ends_a_pump_that_missed_its_cancellation() -> None:
    """Before Python 3.12 `asyncio.wait_for` can swallow a cancellation that arrives with its result; a pump that
    misses its cancellation must still end (it used to block forever on the full queue, and the request with it)."""
    from lmfleet.api.upstream import ChoiceDelta, merge

    class Stubborn:
        def __init__(self) -> None:
            self.closed = False

        async def deltas(self):  # noqa: ANN202
            yield ChoiceDelta(index=0, text="first")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass  # swallowed once
            for _ in range(3):  # more than the queue holds
                yield ChoiceDelta(index=0, text="late")
            await asyncio.Event().wait()

        async def aclose(self) -> None:
            self.closed = True

    stream = Stubborn()
    merged = merge([stream])  # type: ignore[list-item]
    assert (await anext(merged)).text == "first"
    await asyncio.wait_for(merged.aclose(), 10)  # the bound only turns a hang into a failure
    assert stream.closed
