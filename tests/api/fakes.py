"""In-process fakes for the API server's tests: a fake controller, fake workers, and the plumbing to reach them.

* `FakeWorker` answers `POST /worker/generate` (and `/worker/tokenize`, `/worker/detokenize` through the fleet's
  `Vocab`) with deterministic NDJSON derived from the request: the words of
  the prompt (chat: the last message), rotated by `seed`, one word per chunk (token id = the word's position),
  at most `max_tokens` of them (finish_reason "length") else all of them ("stop"). Its first chunk carries the
  prompt's ids (words through the fleet's `Vocab`), and it resumes a generation as a real worker does
  (`resume_token_ids` count as generated, `resume_text_chars` of the text are skipped). It can be told to refuse
  before streaming (`reject`), to stall before the first chunk, or to misbehave after `after` chunks (`then`):
  send an error chunk, abort, break the connection, send a line that is not a chunk, or hang until the client
  goes away; to hold each word's text back until the next chunk (`holdback`, as a real worker holds half a
  UTF-8 character); or not to say what the prompt was (`resumable=False`, as a FastChat worker). It records the
  requests it got and the streams the client closed early (`cancelled`). A word of the reply that is one of the
  request's stop strings ends it there (finish_reason "stop", `stop_string`). `POST /worker/tokenize` answers a
  token id per word of every message (recorded in `tokenized`).
* `FakeFastChatWorker` is the same worker speaking FastChat's protocol (lmfleet.protocol.fastchat): it answers the
  words of the last user turn of the prompt its conversation template (`CONV`) renders, as cumulative objects each
  followed by a NUL byte, and misbehaves the same ways (`then` "error_chunk" is an in-band error; `inband` an
  in-band error code before any text). Its objects carry no token ids: its generations cannot be resumed.
* `FakeController` serves `/list_models`, `/get_worker_address` (round robin) and `/workers` from a dict; a worker
  in `silent` stops heartbeating (its `last_heartbeat` freezes); a FastChat worker's status names no protocol, as
  the controller stores it (`protocols`); a worker reports the prefix hashes in `prefixes` (`Fleet.heartbeat` sets
  them from what each fake worker was sent); `reports[address]` adds fields to a worker's status (a worker that loads
  models on demand: `models`, `memory_budget_bytes`). With `fastchat=True` it is FastChat's controller: no `/workers`.
* A `FakeWorker` also answers a multi-model worker's admin routes (`/worker/models/{load,unload,pin}`), recording
  each call in `model_calls` and answering the model's new state.
* `StreamingASGITransport`: `httpx.ASGITransport` buffers the whole response and never reports a disconnect; this
  one streams the body as the app sends it, and closing the response early sends the app `http.disconnect` and
  waits until the app has finished, so a test can then assert what the app did about it. `Switchable` puts a
  fake behind it, or refuses connections while the fake is `down`.
* `serve(fleet, ...)` starts the API app (lifespan included) with all of that wired in and yields clients for it:
  the official `openai.AsyncOpenAI` and `anthropic.AsyncAnthropic` (over httpx2), plain httpx, and a streaming
  httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import anthropic
import httpx
import httpx2
import openai
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message

from lmfleet.api.app import ApiSettings, create_app
from lmfleet.api.routing import Router
from lmfleet.drain import Drain
from lmfleet.protocol.fastchat import Conversation
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest, TokenizeRequest
from tests.fakes import running

API = "http://api.test"
CONTROLLER = "http://controller.test"


# ---------------------------------------------------------------------------------------------------------------
# Transports


class _Body(httpx.AsyncByteStream):
    def __init__(self, inbox: asyncio.Queue, gone: asyncio.Event, task: asyncio.Task) -> None:
        self._inbox, self._gone, self._task = inbox, gone, task

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._inbox.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise httpx.ReadError(f"the app failed mid-response: {item!r}")
            if item["type"] == "http.response.body":
                if item.get("body"):
                    yield item["body"]
                if not item.get("more_body", False):
                    return

    async def aclose(self) -> None:
        self._gone.set()
        await self._task  # the app has reacted to the disconnect (or had finished anyway)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 50000),
            "root_path": "",
        }
        inbox: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if not gone.is_set():
                inbox.put_nowait(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                inbox.put_nowait(exc)
            finally:
                inbox.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            start = await inbox.get()
        except asyncio.CancelledError:  # the client gave up before the answer started: it disconnects
            gone.set()
            await task
            raise
        if start is None or isinstance(start, BaseException):
            await task
            raise httpx.ReadError(f"the app sent no response: {start!r}")
        return httpx.Response(start["status"], headers=start.get("headers", []), stream=_Body(inbox, gone, task))


class Unreachable(httpx.AsyncBaseTransport):
    """Every host without a fake behind it: connection refused."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"connection refused: {request.url.host}", request=request)


class Switchable(httpx.AsyncBaseTransport):
    """A fake's app, or connection refused while the fake is `down` (a killed process)."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake
        self.inner = StreamingASGITransport(fake.app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.fake.down:
            raise httpx.ConnectError(f"connection refused: {request.url.host}", request=request)
        return await self.inner.handle_async_request(request)


# ---------------------------------------------------------------------------------------------------------------
# Fake controller and workers


class Vocab:
    """Words <-> token ids for fake workers: ids below FIRST are spelled `t{id}`; each new word gets the next id."""

    FIRST = 100_000

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._words: dict[int, str] = {}

    def ids(self, words: list[str]) -> list[int]:
        for w in words:
            if w not in self._ids:
                self._ids[w] = self.FIRST + len(self._ids)
                self._words[self._ids[w]] = w
        return [self._ids[w] for w in words]

    def word(self, token_id: int) -> str:
        return self._words.get(token_id, f"t{token_id}")


def prompt_words(req: GenerateRequest, vocab: Vocab | None = None) -> list[str]:
    if req.messages is not None:
        source = req.messages[-1].content or ""
    elif req.prompt is not None:
        source = req.prompt
    else:
        vocab = vocab or Vocab()
        source = " ".join(vocab.word(i) for i in req.prompt_token_ids or [])
    return source.split()


def expected_reply(words: str, *, max_tokens: int | None = None, seed: int | None = None) -> str:
    """What a FakeWorker answers for a prompt whose words are `words`."""
    ws = words.split()
    shift = (seed or 0) % len(ws)
    return " ".join((ws[shift:] + ws[:shift])[:max_tokens])


Then = Literal["stall", "error_chunk", "abort", "break", "garbage", "hang"]


class FakeWorker:
    def __init__(self, name: str, vocab: Vocab | None = None) -> None:
        self.address = f"http://{name}.test"
        self.models: list[str] = []  # what its /worker_get_status names (the Fleet sets it)
        self.vocab = vocab or Vocab()
        self.requests: list[GenerateRequest] = []
        self.tokenized: list[TokenizeRequest] = []
        self.reject: tuple[int, dict[str, Any]] | None = None  # answer this (status, body) instead
        self.then: Then | None = None  # what to do after `after` chunks ("stall": hang before the first)
        self.after = 1  # chunks sent before `then` happens
        self.holdback = False  # each word's text comes with the next chunk
        self.resumable = True  # the first chunk says what the prompt's token ids are
        self.cached_tokens = 0  # what the first chunk says the worker served from its prefix cache
        self.wait_for: asyncio.Event | None = None  # answer only once this is set
        self.proceed: asyncio.Event | None = None  # with no `then`: pause after `after` chunks until this is set
        self.ready = True  # what GET /ready says
        self.down = False  # refuses connections (see Switchable)
        self.cancelled: list[str] = []  # request ids whose stream the client closed before the end
        self.hanging = asyncio.Event()  # set once a "stall" or "hang" stream is waiting
        self.streamed = asyncio.Event()  # set once a stream has sent its first `after` chunks
        self.model_calls: list[tuple[str, dict[str, Any]]] = []  # (load | unload | pin, body) of /worker/models/*
        self.app = self._make_app()

    def chunks(self, req: GenerateRequest) -> list[GenerateChunk]:
        words = prompt_words(req, self.vocab)
        base = {"request_id": req.request_id, "prompt_tokens": len(words)}
        out = [GenerateChunk(text=req.prompt, **base)] if req.echo and req.prompt else []
        reply = expected_reply(" ".join(words), max_tokens=req.max_tokens, seed=req.seed).split()
        stop = next((word for word in reply if word in req.stop), None)
        if stop is not None:
            reply = reply[: reply.index(stop)]
        texts = [word if i == 0 else " " + word for i, word in enumerate(reply)]
        if self.holdback:  # chunk i sends word i's id and word i-1's text; the last one flushes
            texts = ["", *texts[:-2], texts[-2] + texts[-1]] if len(texts) > 1 else texts
        for i, text in enumerate(texts, 1):
            out.append(GenerateChunk(text=text, token_ids=[i], completion_tokens=i, **base))
            if i == 1:  # a real worker holds text back at times: an empty chunk
                out.append(GenerateChunk(completion_tokens=i, **base))
        if not out:  # a stop string first: nothing to say
            out.append(GenerateChunk(**base))
        out[-1].finish_reason = "length" if len(reply) < len(words) and stop is None else "stop"
        out[-1].stop_string = stop
        if req.resume_token_ids:  # continue after the chunk that carried the last resumed id
            done = len(req.resume_token_ids)
            sent = [c for c in out if not c.token_ids or c.token_ids[-1] <= done]
            held = "".join(c.text for c in sent)[req.resume_text_chars or 0 :]
            out = out[len(sent) :] or [GenerateChunk(finish_reason=out[-1].finish_reason, **base)]
            out[0] = out[0].model_copy(update={"text": held + out[0].text})
        if self.resumable:
            out[0] = out[0].model_copy(update={"prompt_token_ids": self.vocab.ids(words)})
        out[0] = out[0].model_copy(update={"cached_tokens": self.cached_tokens})
        return out

    async def _stream(self, req: GenerateRequest) -> AsyncIterator[bytes]:
        chunks = self.chunks(req)
        finished = False
        try:
            if self.then == "stall":
                self.hanging.set()
                await asyncio.Event().wait()
            for chunk in chunks[: self.after]:
                yield chunk.to_line()
            self.streamed.set()
            if self.then == "error_chunk":
                err = {"message": "generation failed: engine error", "type": "upstream_error"}
                yield GenerateChunk(request_id=req.request_id, finish_reason="error", error=err).to_line()
            elif self.then == "abort":
                yield GenerateChunk(request_id=req.request_id, finish_reason="abort").to_line()
            elif self.then == "break":
                raise RuntimeError("worker crashed mid-stream")
            elif self.then == "garbage":
                yield b'{"not": "a chunk"}\n'
            elif self.then == "hang":
                self.hanging.set()
                await asyncio.Event().wait()
            else:
                if self.proceed is not None:
                    await self.proceed.wait()
                for chunk in chunks[self.after :]:
                    yield chunk.to_line()
            finished = True
        finally:
            if not finished:
                self.cancelled.append(req.request_id)

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/worker/generate")
        async def generate(req: GenerateRequest):
            self.requests.append(req)
            if self.wait_for is not None:
                await self.wait_for.wait()
            if not prompt_words(req, self.vocab):
                err = {"message": "the prompt is empty", "type": "invalid_request_error", "param": "prompt"}
                return JSONResponse({"error": {**err, "code": None}}, status_code=400)
            if self.reject is not None:
                status, body = self.reject
                return JSONResponse(body, status_code=status)
            return StreamingResponse(self._stream(req), media_type="application/x-ndjson")

        @app.post("/worker/tokenize")
        async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
            self.tokenized.append(req)
            words = [w for m in req.messages or [] for w in (m.content or "").split()]
            return {"tokens": self.vocab.ids(words or (req.prompt or "").split()), "max_model_len": 4096}

        @app.get("/ready")
        async def ready() -> JSONResponse:
            return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

        @app.post("/worker_get_status")
        async def worker_get_status() -> dict[str, Any]:
            return {"model_names": self.models, "speed": 1, "queue_length": 0, "protocol": "lmfleet"}

        @app.post("/worker/detokenize")
        async def detokenize(body: dict[str, Any]) -> dict[str, Any]:
            return {"prompt": " ".join(self.vocab.word(t) for t in body.get("tokens") or [])}

        @app.post("/worker/models/{action}")
        async def models(action: str, body: dict[str, Any]) -> dict[str, Any]:
            self.model_calls.append((action, body))
            state = "unloaded" if action == "unload" else "loaded"
            return {"name": body["model"], "state": state, "pinned": bool(body.get("pinned"))}

        return app


# The conversation template of every FakeFastChatWorker: "<system>\nUSER: <words>\nASSISTANT:".
CONV = Conversation(name="fake", roles=("USER", "ASSISTANT"), sep="\n", stop_str="USER:", stop_token_ids=[7])


class FakeFastChatWorker:
    """A FastChat model worker (see the module docstring). `params` records what `/worker_generate_stream` got."""

    context_length = 64

    def __init__(self, name: str) -> None:
        self.address = f"http://{name}.test"
        self.models: list[str] = []
        self.params: list[dict[str, Any]] = []
        self.requests = self.params  # what the tests of either kind of worker count
        self.reject: tuple[int, Any] | None = None  # answer this (status, body) instead
        self.inband: int | None = None  # answer only this in-band error code
        self.then: Then | None = None  # "error_chunk" or "break" after `after` objects
        self.after = 1
        self.down = False
        self.app = self._make_app()

    @staticmethod
    def words(prompt: str) -> list[str]:
        """The words of the prompt's last user turn."""
        return prompt.rpartition("USER: ")[2].partition("\n")[0].split()

    def objects(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        words = self.words(params["prompt"])
        reply = expected_reply(" ".join(words), max_tokens=params["max_new_tokens"]).split()
        usage = {"prompt_tokens": len(params["prompt"].split())}
        out, text = [], params["prompt"] if params.get("echo", True) else ""
        for i, word in enumerate(reply, 1):
            text += word if i == 1 else " " + word
            out.append(
                {"text": text, "error_code": 0, "usage": {**usage, "completion_tokens": i}, "finish_reason": None}
            )
        out[-1]["finish_reason"] = "length" if len(reply) < len(words) else "stop"
        return out

    async def _stream(self, params: dict[str, Any]) -> AsyncIterator[bytes]:
        objects = self.objects(params)
        for obj in objects[: self.after] if self.then else objects:
            yield json.dumps(obj).encode() + b"\0"
        if self.then == "error_chunk":
            yield json.dumps({"text": "CUDA out of memory", "error_code": 50002}).encode() + b"\0"
        elif self.then == "break":
            raise RuntimeError("worker crashed mid-stream")

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/worker_generate_stream")
        async def generate(params: dict[str, Any]):
            self.params.append(params)
            if self.reject is not None:
                status, body = self.reject
                return JSONResponse(body, status_code=status)
            if self.inband is not None:
                return StreamingResponse(iter([json.dumps({"text": "no", "error_code": self.inband}).encode() + b"\0"]))
            return StreamingResponse(self._stream(params))

        @app.post("/worker_get_conv_template")
        async def conv_template() -> dict[str, Any]:
            return {"conv": CONV.model_dump(mode="json")}

        @app.post("/model_details")
        async def model_details() -> dict[str, int]:
            return {"context_length": self.context_length}

        @app.post("/count_token")
        async def count_token(body: dict[str, Any]) -> dict[str, int]:
            return {"count": len(body["prompt"].split()), "error_code": 0}

        @app.post("/worker_get_status")
        async def worker_get_status() -> dict[str, Any]:
            return {"model_names": self.models, "speed": 1, "queue_length": 0}

        return app


class FakeController:
    def __init__(self, models: dict[str, list[str]], *, fastchat: bool = False) -> None:
        self.models = models  # model -> worker addresses (an empty list: listed, but no live worker)
        self.fastchat = fastchat  # FastChat's controller: no /workers
        self.protocols: dict[str, str] = {}  # address -> the protocol its status names (none: lmfleet's default)
        self.silent: set[str] = set()  # addresses that stopped heartbeating
        self.down = False  # refuses connections (see Switchable)
        self.load: dict[str, int] = {}  # address -> the queue length it reports
        self.prefixes: dict[str, list[int]] = {}  # address -> the prefix hashes it reports (Fleet.heartbeat)
        self.reports: dict[str, dict[str, Any]] = {}  # address -> more fields of its status
        self._heartbeats: dict[str, float] = {}
        self._turns: dict[str, itertools.count] = {}
        self.app = self._make_app()

    def workers(self) -> list[dict[str, Any]]:
        names: dict[str, list[str]] = {}
        for model, addresses in sorted(self.models.items()):
            for address in addresses:
                names.setdefault(address, []).append(model)
        out = []
        for address, models in names.items():
            if address not in self.silent or address not in self._heartbeats:
                self._heartbeats[address] = time.monotonic()
            status = {"model_names": models, "queue_length": self.load.get(address, 0)}
            if address in self.protocols:
                status["protocol"] = self.protocols[address]
            if address in self.prefixes:
                status["prefix_hashes"] = self.prefixes[address]
            status.update(self.reports.get(address, {}))
            out.append({"address": address, "status": status, "last_heartbeat": self._heartbeats[address]})
        return out

    def _make_app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/list_models", methods=["GET", "POST"])
        async def list_models() -> dict[str, list[str]]:
            return {"models": sorted(self.models)}

        @app.post("/get_worker_address")
        async def get_worker_address(body: dict[str, Any]) -> dict[str, str]:
            addresses = self.models.get(body["model"]) or [""]
            turn = next(self._turns.setdefault(body["model"], itertools.count()))
            return {"address": addresses[turn % len(addresses)]}

        if not self.fastchat:

            @app.get("/workers")
            async def workers() -> dict[str, list[dict[str, Any]]]:
                return {"workers": self.workers()}

        return app


@dataclass
class Fleet:
    """A fake controller and its fake workers, reachable through one httpx client (`http_client()`)."""

    models: dict[str, list[str]] = field(default_factory=lambda: {"echo": ["a"]})  # model -> worker names
    fastchat: Collection[str] = ()  # the names of the workers that are FastChat's (FakeFastChatWorker)
    fastchat_controller: bool = False  # the controller is FastChat's (no /workers)
    workers: dict[str, Any] = field(init=False)  # name -> FakeWorker | FakeFastChatWorker
    controller: FakeController = field(init=False)

    def __post_init__(self) -> None:
        names = sorted({w for ws in self.models.values() for w in ws})
        self.vocab = Vocab()
        self.workers = {
            name: FakeFastChatWorker(name) if name in self.fastchat else FakeWorker(name, self.vocab) for name in names
        }
        for name, worker in self.workers.items():
            worker.models = sorted(m for m, ws in self.models.items() if name in ws)
        self.controller = FakeController(
            {m: [self.workers[w].address for w in ws] for m, ws in self.models.items()},
            fastchat=self.fastchat_controller,
        )
        self.controller.protocols = {self.workers[name].address: "fastchat" for name in self.fastchat}

    def all_workers(self, **attrs: Any) -> None:
        for worker in self.workers.values():
            for key, value in attrs.items():
                setattr(worker, key, value)

    def heartbeat(self) -> None:
        """Every lmfleet worker reports the prefix hashes of the requests it got (as lmfleet.worker.prefixes)."""
        for worker in self.workers.values():
            if isinstance(worker, FakeWorker):
                served = dict.fromkeys(h for r in worker.requests for h in r.prefix_hashes)
                self.controller.prefixes[worker.address] = list(served)

    def http_client(self) -> httpx.AsyncClient:
        mounts: dict[str, httpx.AsyncBaseTransport] = {CONTROLLER: Switchable(self.controller)}
        mounts |= {w.address: Switchable(w) for w in self.workers.values()}
        return httpx.AsyncClient(mounts=mounts, transport=Unreachable())


# ---------------------------------------------------------------------------------------------------------------
# The API under test


@dataclass
class Api:
    asgi: ASGIApp
    raw: httpx.AsyncClient  # plain httpx (buffered)
    openai: openai.AsyncOpenAI  # the official client
    anthropic: anthropic.AsyncAnthropic  # Anthropic's official client (its key as `Authorization: Bearer`)
    fleet: Fleet
    app: FastAPI
    router: Router  # the app's worker view (lifespan state)
    drain: Drain  # what the process runner awaits on SIGTERM

    def streaming(self, **kw: Any) -> httpx.AsyncClient:
        """An httpx client that streams and can disconnect early."""
        return httpx.AsyncClient(transport=StreamingASGITransport(self.asgi), base_url=API, **kw)


@contextlib.asynccontextmanager
async def serve(fleet: Fleet | None = None, *, api_key: str = "sk-test", **settings: Any) -> AsyncIterator[Api]:
    fleet = fleet or Fleet()
    settings.setdefault("controller_address", CONTROLLER)
    async with fleet.http_client() as upstream:
        drain = Drain()
        app = create_app(ApiSettings(**settings), drain=drain, http_client=upstream)
        async with (
            running(app) as (asgi, state),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url=API) as raw,
            httpx2.AsyncClient(transport=httpx2.ASGITransport(app=asgi), base_url=API) as h2,
        ):
            client = openai.AsyncOpenAI(api_key=api_key, base_url=API + "/v1", http_client=h2, max_retries=0)
            claude = anthropic.AsyncAnthropic(api_key=api_key, base_url=API, http_client=h2, max_retries=0)
            yield Api(
                asgi=asgi,
                raw=raw,
                openai=client,
                anthropic=claude,
                fleet=fleet,
                app=app,
                router=state["router"],
                drain=drain,
            )


def assert_error(
    resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    """The response is an OpenAI error with exactly the four fields; returns the inner object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (blank-line separated events, one data line each)."""
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text
    return [e[len("data: ") :] for e in events]


async def eventually(check: Callable[[], bool]) -> None:
    """Let the event loop run until `check()` holds (no wall-clock timing: pytest-timeout bounds a hang)."""
    while not check():
        await asyncio.sleep(0)
