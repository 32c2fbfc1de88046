"""The controller's one piece of state: which workers are alive, what they serve, and how loaded they say they are.

Owns `FleetRegistry`, the interface the controller app talks to, which every backend implements: async writes
(register / heartbeat / unregister / expire), synchronous reads of the backend's current view (`workers_for(model)`,
`models()`, `all()`), `running()` (the backend's background work, entered by the app's lifespan) and `problem`
(None, or why the view may be stale: the controller's `/ready` says it). Also owns the default backend, `Registry`,
in this process's memory: a worker is alive from its registration until `expiry_s` seconds pass without a
heartbeat (`fastchat_expiry_s` for a FastChat worker, which beats every 45 s: `expiry_of`); every call first drops
workers that are past that (so a reader never sees a dead worker, even between two sweeps), and `running()` sweeps
every `expiry_s / 4`. Several controllers sharing one fleet need a shared backend: lmfleet.controller.etcd.

Does not own: HTTP, authentication, address validation or normalisation (the app hands in clean addresses),
choosing a worker (`dispatch`). The clock is injected (`time.monotonic` by default) so tests drive time by
hand. Not thread-safe: one event loop owns a registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from lmfleet import errors
from lmfleet.protocol import fastchat
from lmfleet.protocol.worker import FASTCHAT, WorkerInfo, WorkerStatus

logger = logging.getLogger("lmfleet.controller")

DEFAULT_EXPIRY_S = 6.0

Load = WorkerStatus | int | None  # what a heartbeat reports: see `FleetRegistry.heartbeat`


class RegistryUnavailable(errors.ServiceUnavailable):
    """A write the backend cannot record now (503; the worker retries at its next heartbeat). The backend logs the
    outage once; the app answers each refused write without logging it again."""


class FleetRegistry(Protocol):
    """What the controller app needs from a registry. Writes may raise `RegistryUnavailable`; reads only before the
    backend has ever known the fleet (a shared one that could not be read yet)."""

    expiry_s: float
    events: Counter[str]  # what this controller did: registered, re-registered, unregistered, expired (its metrics)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The backend's background work (expiry sweep, connection, watch), for the app's lifespan."""
        ...

    @property
    def problem(self) -> str | None:
        """None while the view is current; otherwise why it may be stale (e.g. etcd unreachable)."""
        ...

    async def register(self, address: str, status: WorkerStatus) -> WorkerInfo: ...
    async def heartbeat(self, address: str, status: Load = None) -> bool: ...
    async def unregister(self, address: str) -> bool: ...
    async def expire(self) -> list[str]: ...
    def workers_for(self, model: str) -> list[WorkerInfo]: ...
    def models(self) -> list[str]: ...
    def all(self) -> list[WorkerInfo]: ...


def apply_load(current: WorkerStatus, report: Load) -> WorkerStatus:
    """The status after a heartbeat: a full `WorkerStatus` (lmfleet workers) replaces it; a queue length (FastChat
    workers) replaces `queue_length` and clears the running/waiting split it does not report; None (liveness only)
    keeps it."""
    if isinstance(report, WorkerStatus):
        return report
    if report is None:
        return current
    cleared = {"running": 0, "waiting": 0, "tokens_in_flight": 0, "kv_cache_usage": None}
    return current.model_copy(update={"queue_length": int(report), **cleared})


def expiry_of(status: WorkerStatus, expiry_s: float, fastchat_expiry_s: float) -> float:
    """How long a worker may stay silent: a FastChat worker heartbeats every 45 s (FastChat's own controller waits
    90 s), so it gets `fastchat_expiry_s`, or `expiry_s` if that is longer."""
    return max(expiry_s, fastchat_expiry_s) if status.protocol == FASTCHAT else expiry_s


class WorkerViews:
    """The three reads every backend answers the same way, over `_live()`: its current workers in registration
    order."""

    def _live(self) -> list[WorkerInfo]:
        raise NotImplementedError

    def workers_for(self, model: str) -> list[WorkerInfo]:
        """Live workers serving `model`, in registration order."""
        return [info for info in self._live() if model in info.status.model_names]

    def models(self) -> list[str]:
        """Every model some live worker serves, sorted, without duplicates."""
        return sorted({name for info in self._live() for name in info.status.model_names})

    def all(self) -> list[WorkerInfo]:
        """Every live worker, in registration order."""
        return self._live()


class Registry(WorkerViews):
    """Live workers keyed by address (the worker's base URL, FastChat's `worker_name`), in this process's memory."""

    problem: str | None = None  # nothing can make this view stale

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        expiry_s: float = DEFAULT_EXPIRY_S,
        fastchat_expiry_s: float = fastchat.HEARTBEAT_EXPIRY_S,
    ) -> None:
        if not expiry_s > 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s!r}")
        self._clock = clock
        self.expiry_s = float(expiry_s)
        self.fastchat_expiry_s = float(fastchat_expiry_s)
        self._workers: dict[str, WorkerInfo] = {}
        self.events: Counter[str] = Counter()  # registered, re-registered, unregistered, expired (the metrics)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Sweep expired workers every `expiry_s / 4` (reads and writes also drop them as they go)."""

        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(self.expiry_s / 4)
                try:
                    self._expire(self._clock())
                except Exception:  # the sweep must outlive any bug in one pass
                    logger.exception("expiring workers failed")

        sweeper = asyncio.create_task(sweep_forever(), name="lmfleet-controller-expiry")
        try:
            yield
        finally:
            await cancel(sweeper)

    # -- writes ----------------------------------------------------------------------------------------------

    async def register(self, address: str, status: WorkerStatus) -> WorkerInfo:
        """Add a worker, or replace everything known about an address that registers again."""
        now = self._clock()
        self._expire(now)
        info = WorkerInfo(address=address, status=status, last_heartbeat=now)
        known = address in self._workers
        self._workers[address] = info
        self.events["re-registered" if known else "registered"] += 1
        log_registered(address, status, known)
        return info

    async def heartbeat(self, address: str, status: Load = None) -> bool:
        """Refresh a known worker's liveness and load (`apply_load`). False when the address is unknown (never
        registered, unregistered, expired, or the controller restarted): the worker must register again, and
        nothing is added here."""
        now = self._clock()
        self._expire(now)
        info = self._workers.get(address)
        if info is None:
            return False
        self._workers[address] = WorkerInfo(address=address, status=apply_load(info.status, status), last_heartbeat=now)
        return True

    async def unregister(self, address: str) -> bool:
        """Forget a worker (it is shutting down). True when it was known."""
        removed = self._workers.pop(address, None) is not None
        if removed:
            self.events["unregistered"] += 1
            logger.info("unregistered worker %s", address)
        return removed

    async def expire(self) -> list[str]:
        """Drop every worker whose last heartbeat is more than its expiry (`expiry_of`) ago; return their
        addresses."""
        return self._expire(self._clock())

    def _expire(self, now: float) -> list[str]:
        dead = [
            a
            for a, info in self._workers.items()
            if now - info.last_heartbeat > expiry_of(info.status, self.expiry_s, self.fastchat_expiry_s)
        ]
        for address in dead:
            info = self._workers.pop(address)
            self.events["expired"] += 1
            logger.info("expired worker %s: no heartbeat for %.1fs", address, now - info.last_heartbeat)
        return dead

    def _live(self) -> list[WorkerInfo]:
        self._expire(self._clock())
        return list(self._workers.values())


def log_registered(address: str, status: WorkerStatus, known: bool) -> None:
    logger.info(
        "%s worker %s models=%s speed=%g",
        "re-registered" if known else "registered",
        address,
        ",".join(status.model_names),
        status.speed,
    )


async def cancel(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait until it has stopped."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
