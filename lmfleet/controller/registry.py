"""The controller's one piece of state: which workers are alive, what they serve, and how loaded they say they are.

Owns: register / heartbeat / unregister / expire, and the read views (`workers_for(model)`, `models()`,
`all()`). A worker is alive from its registration until `expiry_s` seconds pass without a heartbeat; every call
first drops workers that are past that (so a reader never sees a dead worker, even between two runs of the
app's background sweep), and `expire()` is the sweep itself.

Does not own: HTTP, authentication, address validation or normalisation (the app hands in clean addresses),
choosing a worker (`dispatch`). The clock is injected (`time.monotonic` by default) so tests drive time by
hand. Not thread-safe: one event loop owns a registry.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from lmfleet.protocol.worker import WorkerInfo, WorkerStatus

logger = logging.getLogger("lmfleet.controller")

DEFAULT_EXPIRY_S = 6.0


class Registry:
    """Live workers keyed by address (the worker's base URL, FastChat's `worker_name`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, expiry_s: float = DEFAULT_EXPIRY_S) -> None:
        if not expiry_s > 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s!r}")
        self._clock = clock
        self.expiry_s = float(expiry_s)
        self._workers: dict[str, WorkerInfo] = {}
        self.events: Counter[str] = Counter()  # registered, re-registered, unregistered, expired (the metrics)

    # -- writes ----------------------------------------------------------------------------------------------

    def register(self, address: str, status: WorkerStatus) -> WorkerInfo:
        """Add a worker, or replace everything known about an address that registers again."""
        now = self._clock()
        self.expire(now)
        info = WorkerInfo(address=address, status=status, last_heartbeat=now)
        known = address in self._workers
        self._workers[address] = info
        self.events["re-registered" if known else "registered"] += 1
        logger.info(
            "%s worker %s models=%s speed=%g",
            "re-registered" if known else "registered",
            address,
            ",".join(status.model_names),
            status.speed,
        )
        return info

    def heartbeat(self, address: str, status: WorkerStatus | int | None = None) -> bool:
        """Refresh a known worker's liveness and load. False when the address is unknown (never registered,
        unregistered, expired, or the controller restarted): the worker must register again, and nothing is
        added here.

        `status` is a full `WorkerStatus` (lmfleet workers: replaces the stored one), a queue length (FastChat
        workers: replaces `queue_length` and clears the running/waiting split it does not report), or None
        (liveness only)."""
        now = self._clock()
        self.expire(now)
        info = self._workers.get(address)
        if info is None:
            return False
        if isinstance(status, WorkerStatus):
            new_status = status
        elif status is not None:
            new_status = info.status.model_copy(
                update={
                    "queue_length": int(status),
                    "running": 0,
                    "waiting": 0,
                    "tokens_in_flight": 0,
                    "kv_cache_usage": None,
                }
            )
        else:
            new_status = info.status
        self._workers[address] = WorkerInfo(address=address, status=new_status, last_heartbeat=now)
        return True

    def unregister(self, address: str) -> bool:
        """Forget a worker (it is shutting down). True when it was known."""
        removed = self._workers.pop(address, None) is not None
        if removed:
            self.events["unregistered"] += 1
            logger.info("unregistered worker %s", address)
        return removed

    def expire(self, now: float | None = None) -> list[str]:
        """Drop every worker whose last heartbeat is more than `expiry_s` before `now`; return their addresses."""
        if now is None:
            now = self._clock()
        dead = [a for a, info in self._workers.items() if now - info.last_heartbeat > self.expiry_s]
        for address in dead:
            info = self._workers.pop(address)
            self.events["expired"] += 1
            logger.info("expired worker %s: no heartbeat for %.1fs", address, now - info.last_heartbeat)
        return dead

    # -- reads -----------------------------------------------------------------------------------------------

    def workers_for(self, model: str) -> list[WorkerInfo]:
        """Live workers serving `model`, in registration order."""
        self.expire()
        return [info for info in self._workers.values() if model in info.status.model_names]

    def models(self) -> list[str]:
        """Every model some live worker serves, sorted, without duplicates."""
        self.expire()
        return sorted({name for info in self._workers.values() for name in info.status.model_names})

    def all(self) -> list[WorkerInfo]:
        """Every live worker, in registration order."""
        self.expire()
        return list(self._workers.values())
