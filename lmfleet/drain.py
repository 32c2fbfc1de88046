"""The graceful drain every serving process shares: once told to stop, take nothing new and let the requests in
progress finish.

Owns `Drain`, one per app: the count of requests in progress, the draining flag and the callbacks to run when a
drain begins (a worker leaves its controllers), and `DrainGate`, the pure ASGI middleware that keeps the count
(every HTTP request but the exempt paths, a streamed response until its last byte) and, once draining, answers a
new request 503 service_unavailable with `Connection: close`. Each app's `/ready` answers 503 from the same
moment, so a load balancer stops sending. `await Drain.drain()` returns once no request is in progress, or after
`timeout_s`; the process runner (lmfleet.server) awaits it on the first SIGTERM, before uvicorn's own graceful
shutdown closes the socket.

Does not own: signals and the server (lmfleet.server), what a process does beyond refusing and waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from lmfleet import errors

logger = logging.getLogger("lmfleet")

DEFAULT_EXEMPT = frozenset({"/health", "/ready"})  # never counted, never refused: liveness and readiness
DEFAULT_TIMEOUT_S = 30.0
_POLL_S = 0.05


class Drain:
    """The draining flag and the requests in progress of one app."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError("the drain timeout must be positive")
        self.timeout_s = timeout_s
        self.draining = False
        self.in_progress = 0
        self._on_start: list[Callable[[], Awaitable[None]]] = []

    def on_start(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` when the drain begins, after new requests are refused (a worker leaves its controllers)."""
        self._on_start.append(callback)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests from now on; wait until none is in progress (True) or the timeout passed (False)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not self.draining:
            logger.info("draining: refusing new requests, %d in progress", self.in_progress)
            self.draining = True
            for callback in self._on_start:
                try:
                    await callback()
                except Exception:
                    logger.exception("a drain callback failed")
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

    def __init__(self, app: ASGIApp, drain: Drain, exempt: Collection[str] = DEFAULT_EXEMPT) -> None:
        self.app = app
        self.drain = drain
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            exc = errors.ServiceUnavailable("This server is shutting down; retry on another one.")
            headers = {"Connection": "close", "Retry-After": "1"}
            await errors.response(exc, scope, headers)(scope, receive, send)
            return
        self.drain.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_progress -= 1
