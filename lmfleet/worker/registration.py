"""A worker's membership in the fleet: registration and heartbeats to one or more controllers.

Owns `Registration`: heartbeat every interval with the worker's load, or `EARLY_S` after the worker has news for the API
servers (`early`: it served a prompt prefix it did not hold, lmfleet.worker.prefixes); register at once when a
controller does not know the worker (first start, or the controller restarted and forgot it); while the worker cannot
serve (engine stopped, or draining), leave every controller so no traffic comes, and stop heartbeating; `leave()`
unregisters everywhere (the drain and the shutdown). A controller that cannot be reached is retried every interval and
logged once per outage. At start, a worker that advertises an address no other host can reach (loopback, or the
unspecified 0.0.0.0 of `--host 0.0.0.0`) to a controller on another host is warned about (`unreachable_address`): that
controller would list it, and the API servers it feeds could not connect.

Does not own: the HTTP calls (lmfleet.client.ControllerClient), what the load report holds (the worker app).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from lmfleet import errors
from lmfleet.client import ControllerClient
from lmfleet.protocol.worker import WorkerStatus

logger = logging.getLogger("lmfleet.worker")

HEARTBEAT_INTERVAL_S = 2.0  # a worker's default heartbeat interval (`--heartbeat-interval`)
EARLY_S = 0.2  # after news, the heartbeat waits this long for more (at most one early heartbeat per EARLY_S)


def _local_only(url: str) -> bool:
    """True when the URL's host means "this machine" to whoever uses it: loopback, localhost, or unspecified."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: another host's, as far as can be told without resolving it
    return ip.is_loopback or ip.is_unspecified


def unreachable_address(worker_address: str, controllers: Sequence[str]) -> str | None:
    """Why `worker_address` cannot work for these controllers (one on another host, while the address only means
    this machine), or None."""
    remote = [c for c in controllers if not _local_only(c)]
    if not remote or not _local_only(worker_address):
        return None
    return (
        f"this worker advertises {worker_address} to controller {', '.join(remote)} on another host, which cannot "
        "reach it there: bind --host 0.0.0.0 (or this host's address) and set --worker-address to a URL the "
        "controllers and API servers can reach"
    )


class Registration:
    def __init__(
        self,
        controllers: Sequence[ControllerClient],
        address: str,
        *,
        status: Callable[[], WorkerStatus],
        serving: Callable[[], bool],
        interval_s: float,
        early: asyncio.Event | None = None,
    ) -> None:
        self.controllers = list(controllers)
        self._early = early
        self.address = address
        self._status = status
        self._serving = serving
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        problem = unreachable_address(self.address, [c.address for c in self.controllers])
        if problem is not None:
            logger.warning("%s", problem)
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
            await self._until_next()

    async def _until_next(self) -> None:
        """Until the next heartbeat is due: the interval, or EARLY_S after `early` is set."""
        if self._early is None:
            await asyncio.sleep(self.interval_s)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._early.wait(), self.interval_s)
            await asyncio.sleep(min(EARLY_S, self.interval_s))
        self._early.clear()
