"""Typed async clients for the controller and the workers, over one pooled `httpx.AsyncClient`.

Each process creates one `httpx.AsyncClient` (see `make_http_client`) in its app's lifespan and hands it to
these clients; nothing here owns a connection pool or global state. Transport failures become `UpstreamError`
(or `ServiceUnavailable` for the controller); OpenAI-shaped error bodies from a worker are rebuilt with
`errors.from_body`, so the API server passes a worker's 400 on to its client unchanged (any other error body is the
worker's failure: 502).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

import httpx
from pydantic import BaseModel

from lmfleet import errors, requestid
from lmfleet.protocol.worker import (
    GenerateChunk,
    GenerateRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterWorkerRequest,
    WorkerInfo,
    WorkerStatus,
)

logger = logging.getLogger("lmfleet.client")

R = TypeVar("R", bound=BaseModel)

DEFAULT_CONTROLLER = "http://127.0.0.1:21001"  # FastChat's controller port, on this machine

# Connecting must be quick (a dead peer is detected at once); reading a stream may wait for a long prefill.
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=300.0, write=30.0, pool=30.0)
CONTROL_TIMEOUT = httpx.Timeout(5.0, connect=3.0)


def make_http_client(*, max_connections: int = 1000) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=100)
    return httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, limits=limits, trust_env=False)


def _auth(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


async def raise_for_error(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    await resp.aread()
    try:
        body = resp.json()
    except ValueError:
        body = None
    exc = errors.from_body(resp.status_code, body)
    if "retry-after" in resp.headers:
        exc.headers["Retry-After"] = resp.headers["retry-after"]
    raise exc


def _unreachable(cls: type[errors.LmfleetError], what: str, address: str, exc: Exception) -> errors.LmfleetError:
    """The peer's address goes to the (debug) log, not into an error a public client may read. Callers log what
    the failure means once (a worker ejected, a controller down), not every failed call."""
    logger.debug("%s %s: %s: %s", what, address, type(exc).__name__, exc)
    return cls(f"{what} unavailable ({type(exc).__name__})")


class ControllerClient:
    """Talks to one controller. `secret` is the registration secret workers present (never logged)."""

    def __init__(self, http: httpx.AsyncClient, address: str, *, secret: str | None = None) -> None:
        self.http = http
        self.address = address.rstrip("/")
        self._headers = _auth(secret)

    async def _post(self, path: str, payload: dict) -> httpx.Response:
        try:
            resp = await self.http.post(
                self.address + path, json=payload, headers=self._headers, timeout=CONTROL_TIMEOUT
            )
        except httpx.HTTPError as exc:
            raise _unreachable(errors.ServiceUnavailable, "controller", self.address, exc) from exc
        await raise_for_error(resp)
        return resp

    async def register(self, worker_address: str, status: WorkerStatus) -> None:
        req = RegisterWorkerRequest(worker_name=worker_address, check_heart_beat=True, worker_status=status)
        await self._post("/register_worker", req.model_dump(exclude_none=True))

    async def heartbeat(self, worker_address: str, status: WorkerStatus) -> bool:
        """True when the controller knows this worker; False means: register again."""
        req = HeartbeatRequest(worker_name=worker_address, queue_length=status.queue_length, worker_status=status)
        resp = await self._post("/receive_heart_beat", req.model_dump(exclude_none=True))
        return HeartbeatResponse.model_validate(resp.json()).exist

    async def unregister(self, worker_address: str) -> None:
        await self._post("/unregister_worker", {"worker_name": worker_address})

    async def get(self, path: str) -> httpx.Response:
        """`GET path`, whatever its status; ServiceUnavailable when the controller cannot be reached."""
        try:
            return await self.http.get(self.address + path, headers=self._headers, timeout=CONTROL_TIMEOUT)
        except httpx.HTTPError as exc:
            raise _unreachable(errors.ServiceUnavailable, "controller", self.address, exc) from exc

    async def workers(self) -> list[WorkerInfo]:
        resp = await self.get("/workers")
        await raise_for_error(resp)
        return [WorkerInfo.model_validate(w) for w in resp.json()["workers"]]


class WorkerClient:
    """Talks to any worker; the address is per call because the API server picks a worker per request."""

    def __init__(self, http: httpx.AsyncClient, *, secret: str | None = None) -> None:
        self.http = http
        self._headers = _auth(secret)  # the fleet's shared secret, when the workers require it

    async def status(self, address: str) -> WorkerStatus:
        try:
            resp = await self.http.get(
                address.rstrip("/") + "/worker/status", headers=self._headers, timeout=CONTROL_TIMEOUT
            )
        except httpx.HTTPError as exc:
            raise _unreachable(errors.UpstreamError, "worker", address, exc) from exc
        await raise_for_error(resp)
        return WorkerStatus.model_validate(resp.json())

    async def ready(self, address: str, *, timeout: float = 2.0) -> bool:
        """True when the worker answers `GET /ready` with 200 within `timeout` seconds (it can serve)."""
        try:
            resp = await self.http.get(address.rstrip("/") + "/ready", timeout=timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def generate(self, address: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream a generation. Validation errors raise before the first chunk; a broken stream raises
        `UpstreamError` after the chunks received so far. Closing the iterator closes the connection, which
        the worker treats as a cancel."""
        url = address.rstrip("/") + "/worker/generate"
        try:
            body = request.model_dump(exclude_none=True)
            request_id = requestid.current()  # the API server's request: the worker logs it under the same id
            headers = {**self._headers, requestid.HEADER: request_id} if request_id else self._headers
            async with self.http.stream("POST", url, json=body, headers=headers) as resp:
                await raise_for_error(resp)
                async for line in resp.aiter_lines():
                    if line:
                        yield _parse_chunk(line, address)
        except httpx.HTTPError as exc:
            raise _unreachable(errors.UpstreamError, "worker", address, exc) from exc

    async def call(self, address: str, path: str, request: BaseModel, answer: type[R]) -> R:
        """One JSON request, one JSON answer (`/worker/embed`, `/worker/tokenize`, `/worker/detokenize`). A worker's
        error body is raised as its `LmfleetError`; a transport failure or an answer that is not `answer` as
        `UpstreamError`."""
        try:
            resp = await self.http.post(
                address.rstrip("/") + path, json=request.model_dump(exclude_none=True), headers=self._headers
            )
            await raise_for_error(resp)
            return answer.model_validate_json(resp.content)
        except httpx.HTTPError as exc:
            raise _unreachable(errors.UpstreamError, "worker", address, exc) from exc
        except ValueError as exc:  # pydantic's ValidationError: not the answer a worker gives
            raise _unreachable(errors.UpstreamError, "worker", address, exc) from exc


def _parse_chunk(line: str, address: str) -> GenerateChunk:
    try:
        return GenerateChunk.model_validate(json.loads(line))
    except ValueError as exc:  # includes pydantic's ValidationError
        raise _unreachable(errors.UpstreamError, "worker", address, exc) from exc
