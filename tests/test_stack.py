"""The whole stack in one process: the real API app over two real worker apps over scripted engines, with the
real controller app between them, all over ASGI. What the failover tests check against fake workers is checked
here against the worker's own resume code: a stream cut mid-way continues on the other replica with no gap, no
duplicate, the same id and usage counted once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI

from lmfleet.api.app import ApiSettings
from lmfleet.api.app import create_app as create_api
from lmfleet.controller.app import ControllerSettings
from lmfleet.controller.app import create_app as create_controller
from lmfleet.worker.app import WorkerSettings
from lmfleet.worker.app import create_app as create_worker
from tests.api.fakes import StreamingASGITransport
from tests.fakes import ScriptedEngine, loaded, running

pytestmark = pytest.mark.timeout(60)

CONTROLLER, API = "http://controller", "http://api"
SCRIPT = "Once upon a tïme, a wörker 🙂 died mid-sentence; its twin went on. "


class Hosts(httpx.AsyncBaseTransport):
    """Routes each request by `scheme://host` to an app's transport; any other host refuses the connection."""

    def __init__(self) -> None:
        self.routes: dict[str, httpx.AsyncBaseTransport] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        route = self.routes.get(f"{request.url.scheme}://{request.url.host}")
        if route is None:
            raise httpx.ConnectError(f"connection refused: {request.url.host}", request=request)
        return await route.handle_async_request(request)


@dataclass
class Cut:
    """One planned failure: the first generate stream that would pass `after_tokens` generated tokens breaks at the
    last chunk boundary before that point, and its worker refuses connections from then on, as a killed process
    would. Counted in tokens, not lines: a worker merges several tokens into one chunk when its reader falls behind
    (a busy machine), so the cut lands at or before the planned token, never after the stream's end."""

    after_tokens: int | None = None
    victim: str | None = None


class Link(httpx.AsyncBaseTransport):
    def __init__(self, name: str, inner: httpx.AsyncBaseTransport, cut: Cut) -> None:
        self.name, self.inner, self.cut = name, inner, cut

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut.victim == self.name:
            raise httpx.ConnectError("connection refused", request=request)
        response = await self.inner.handle_async_request(request)
        if request.url.path != "/worker/generate":
            return response
        return httpx.Response(response.status_code, headers=response.headers, stream=self._watched(response))

    def _watched(self, response: httpx.Response) -> httpx.AsyncByteStream:
        inner, link = response.stream, self

        class Watched(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                sent, pending = 0, b""  # tokens passed on; the start of a line not complete yet
                async for part in inner:  # type: ignore[union-attr]
                    *lines, pending = (pending + part).split(b"\n")
                    coming = sum(len(json.loads(line)["token_ids"]) for line in lines if line.strip())
                    cut = link.cut
                    if cut.victim is None and cut.after_tokens is not None and sent + coming > cut.after_tokens:
                        cut.victim = link.name
                        raise httpx.ReadError("connection reset by peer")
                    sent += coming
                    yield part

            async def aclose(self) -> None:
                await inner.aclose()  # type: ignore[union-attr]

        return Watched()


async def open_stack(
    exits: contextlib.AsyncExitStack,
    make_worker: Callable[[str, httpx.AsyncClient], FastAPI],
    workers: Sequence[str] = ("http://worker-a", "http://worker-b"),
) -> tuple[openai.AsyncOpenAI, httpx.AsyncClient, Cut]:
    """The real controller app, a worker app per address of `workers` (`make_worker(address, http_client)`) and
    the real API app over ASGI in one process, closed with `exits`: the official client and a raw httpx client to
    the API, and the cut between the API and the workers."""
    cut, hosts = Cut(), Hosts()
    http = await exits.enter_async_context(httpx.AsyncClient(transport=hosts))
    controller, _ = await exits.enter_async_context(running(create_controller(ControllerSettings())))
    hosts.routes[CONTROLLER] = StreamingASGITransport(controller)
    for name in workers:
        app, _ = await exits.enter_async_context(running(make_worker(name, http)))
        hosts.routes[name] = Link(name, StreamingASGITransport(app), cut)
    api_settings = ApiSettings(controller_address=CONTROLLER, refresh_interval_s=0.05)
    api, state = await exits.enter_async_context(running(create_api(api_settings, http_client=http)))
    for _ in range(500):
        if len(state["router"].healthy()) == len(workers):
            break
        await asyncio.sleep(0.02)
    assert len(state["router"].healthy()) == len(workers), "every worker registered and in the API server's view"
    raw = await exits.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url=API))
    h2 = await exits.enter_async_context(httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api), base_url=API))
    return openai.AsyncOpenAI(base_url=API + "/v1", api_key="none", max_retries=0, http_client=h2), raw, cut


def worker_settings(name: str, **kw: Any) -> WorkerSettings:
    return WorkerSettings(worker_address=name, controller_addresses=[CONTROLLER], heartbeat_interval_s=0.05, **kw)


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[openai.AsyncOpenAI, Cut]]:
    def worker(name: str, http: httpx.AsyncClient) -> FastAPI:
        engine = ScriptedEngine(SCRIPT, max_model_len=512, step_s=0.002, continuing=True)
        # Named by its path, as FastChat names a model; requests below use its file name, "story".
        settings = worker_settings(name, model_path="/models/story.gguf")
        return create_worker(settings, load=lambda _s: loaded(engine), http_client=http)

    async with contextlib.AsyncExitStack() as exits:
        client, _, cut = await open_stack(exits, worker)
        yield client, cut


async def story(client: openai.AsyncOpenAI, **kw) -> tuple[str, list]:
    stream = await client.chat.completions.create(
        model="story",
        messages=[{"role": "user", "content": "Tell me."}],
        stream=True,
        temperature=0,
        max_tokens=80,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **kw,
    )
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {"/models/story.gguf"}  # "story" answered to by its only claimant
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def inside(text: str, piece: str, into: int) -> int:
    """How many tokens (bytes) of `text` come before the `into`-th byte of `piece`: a cut there splits it."""
    data = text.encode()
    return data.index(piece.encode()) + into


@pytest.mark.parametrize(("piece", "into"), [("d", 0), ("ï", 1), ("🙂", 2), ("Once", 0)])
async def test_a_stream_cut_mid_way_resumes_on_the_real_worker_beside_it(fleet, piece: str, into: int) -> None:
    """Cut between two characters, inside a two-byte and inside a four-byte character."""
    client, cut = fleet
    whole, _ = await story(client)
    cut.after_tokens = inside(whole, piece, into)
    text, chunks = await story(client)
    assert cut.victim is not None, "the stream was cut"
    assert text == whole
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage.completion_tokens == 80


async def test_a_stop_string_split_by_the_cut_still_stops(fleet) -> None:
    client, cut = fleet
    whole, _ = await story(client, stop=["wörker"])
    assert whole.endswith("Once upon a tïme, a ")
    cut.after_tokens = inside(whole + "wörker", "wörker", 2)  # after "w" and half of "ö" went out
    text, chunks = await story(client, stop=["wörker"])
    assert cut.victim is not None
    assert text == whole
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"
