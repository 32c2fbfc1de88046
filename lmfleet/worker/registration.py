"""A worker's membership in the fleet: registration and heartbeats to one or more controllers.

Owns `Registration`: heartbeat every interval with the worker's load; register at once when a controller does not
know the worker (first start, or the controller restarted and forgot it); while the worker cannot serve (engine
stopped, or draining), leave every controller so no traffic comes, and stop heartbeating; `leave()` unregisters
everywhere (the drain and the shutdown). A controller that cannot be reached is retried every interval and logged
once per outage.

Does not own: the HTTP calls (lmfleet.client.ControllerClient), what the load report holds (the worker app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from lmfleet import errors
from lmfleet.client import ControllerClient
from lmfleet.protocol.worker import WorkerStatus

logger = logging.getLogger("lmfleet.worker")


class Registration:
    def __init__(
        self,
        controllers: Sequence[ControllerClient],
        address: str,
        *,
        status: Callable[[], WorkerStatus],
        serving: Callable[[], bool],
        interval_s: float,
    ) -> None:
        self.controllers = list(controllers)
        self.address = address
        self._status = status
        self._serving = serving
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.controllers and self._task is None:
            self._task = asyncio.create_task(self._keep_registered(), name="lmfleet-heartbeat")

    async def leave(self) -> None:
        """Stop heartbeating and unregister from every controller (concurrently; failures are only logged)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        controllers, self.controllers = self.controllers, []
        results = await asyncio.gather(*(c.unregister(self.address) for c in controllers), return_exceptions=True)
        for c, result in zip(controllers, results, strict=True):
            if isinstance(result, Exception):
                logger.warning("could not unregister from controller %s: %s", c.address, result)

    async def _keep_registered(self) -> None:
        known = {c.address: False for c in self.controllers}
        failing: set[str] = set()
        while True:
            if not self._serving():
                for c in self.controllers:
                    if known[c.address]:
                        logger.warning("this worker cannot serve: leaving controller %s", c.address)
                        known[c.address] = False
                        with contextlib.suppress(errors.LmfleetError):
                            await c.unregister(self.address)
                await asyncio.sleep(self.interval_s)
                continue
            for c in self.controllers:
                try:
                    if known[c.address]:
                        known[c.address] = await c.heartbeat(self.address, self._status())
                    if not known[c.address]:
                        status = self._status()
                        await c.register(self.address, status)
                        known[c.address] = True
                        logger.info(
                            "registered %s (%s) with controller %s", self.address, status.model_names, c.address
                        )
                    failing.discard(c.address)
                except errors.LmfleetError as exc:
                    known[c.address] = False
                    if c.address not in failing:
                        logger.warning(
                            "controller %s: %s; retrying every %.1fs", c.address, exc.message, self.interval_s
                        )
                        failing.add(c.address)
            await asyncio.sleep(self.interval_s)
