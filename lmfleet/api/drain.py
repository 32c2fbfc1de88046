"""The API server's graceful drain: once told to stop, take nothing new and let the requests in progress finish.

Owns `Drain`, one per app: the count of requests in progress and the draining flag, and `DrainGate`, the pure ASGI
middleware that keeps the count (every HTTP request but `EXEMPT`) and, once draining, answers a new request 503
service_unavailable with `Connection: close`. `/ready` answers 503 from the same moment (lmfleet.api.app), so a
load balancer stops sending. `await Drain.drain(timeout_s)` returns once no request is in progress, or after
`timeout_s`; the process runner (lmfleet.cli) awaits it on the first SIGTERM, before uvicorn's own graceful
shutdown closes the socket.

Does not own: signals and the server (lmfleet.cli), the workers' drain (lmfleet.worker.app).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmfleet import errors

logger = logging.getLogger("lmfleet.api")

EXEMPT = frozenset({"/health", "/ready"})  # never counted, never refused: liveness and readiness
_POLL_S = 0.05


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_progress = 0

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests from now on; wait until none is in progress (True) or `timeout_s` passed (False)."""
        if not self.draining:
            logger.info("draining: refusing new requests, %d in progress", self.in_progress)
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_progress and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)
        if self.in_progress:
            logger.warning("drain timeout (%gs): %d request(s) still in progress", timeout_s, self.in_progress)
            return False
        logger.info("drained: no request in progress")
        return True


class DrainGate:
    """Counts requests in progress; while draining, answers new ones 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            exc = errors.ServiceUnavailable("This server is shutting down; retry on another one.")
            headers = {"Connection": "close", "Retry-After": "1"}
            await JSONResponse(exc.body(), status_code=exc.status, headers=headers)(scope, receive, send)
            return
        self.drain.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_progress -= 1
