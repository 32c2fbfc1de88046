"""Dispatch policies: given the live workers for a model, pick one. Policies are values, chosen by name.

A policy is a pure function `(workers, rng) -> WorkerInfo`: no I/O, no clock, no state beyond the `rng` it is
handed, so the same inputs and the same seed give the same pick. It belongs to neither side: the controller uses
it for `/get_worker_address`, and the API server dispatches with it from its cached `/workers` view (so it keeps
serving while the controller is down). Keep it dependency-free (standard library only at runtime).

    "shortest_queue"  (default) the least load per unit of speed; ties broken at random, so idle replicas share
                      the traffic. Load is `max(queue_length, running + waiting)`: a FastChat worker only
                      reports `queue_length`; an lmfleet worker also reports the split, and among equal loads
                      the one with fewer *waiting* requests (free batch slots) wins.
    "lottery"         random, weighted by `speed` (FastChat's "lottery"), load ignored.

The load a worker reports is trusted. Its bounds are enforced when it is parsed (`WorkerStatus`: speed in
(0, 1e6], queue_length <= 1e7, running and waiting <= 2^40) and again here (a non-finite or non-positive speed counts
as 1, a load is clamped to [0, 1e7]), so no report can crash a policy, overflow it or make it divide by zero;
but a worker can still claim to be idle and attract traffic. Only registered workers are dispatched to, which
is what the controller's registration secret and allowed worker networks are for.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dispatch reads the fields of WorkerInfo; it needs no pydantic at runtime
    from lmfleet.protocol.worker import WorkerInfo, WorkerStatus

Policy = Callable[[Sequence["WorkerInfo"], random.Random], "WorkerInfo"]

DEFAULT_POLICY = "shortest_queue"
_MAX_SPEED = 1_000_000.0
_MAX_LOAD = 10_000_000  # WorkerStatus's bound; clamped again so no int ever overflows a float division


def speed(status: WorkerStatus) -> float:
    """The worker's relative capacity, clamped to (0, 1e6]; anything non-finite or non-positive counts as 1."""
    s = float(status.speed)
    if not math.isfinite(s) or s <= 0:
        return 1.0
    return min(s, _MAX_SPEED)


def load(status: WorkerStatus) -> int:
    """Requests the worker holds: running + waiting when it says so, else FastChat's `queue_length`; in
    [0, 1e7]."""
    return min(max(int(status.queue_length), int(status.running) + int(status.waiting), 0), _MAX_LOAD)


def _require(workers: Sequence[WorkerInfo]) -> None:
    if not workers:
        raise ValueError("no workers to choose from")


def shortest_queue(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    _require(workers)

    def key(w: WorkerInfo) -> tuple[float, float]:
        s = speed(w.status)
        return (load(w.status) / s, min(max(int(w.status.waiting), 0), _MAX_LOAD) / s)

    keys = [key(w) for w in workers]
    best = min(keys)
    return rng.choice([w for w, k in zip(workers, keys, strict=True) if k == best])


def lottery(workers: Sequence[WorkerInfo], rng: random.Random) -> WorkerInfo:
    _require(workers)
    return rng.choices(list(workers), weights=[speed(w.status) for w in workers], k=1)[0]


# Read-only: the set of policies is fixed at import; add one by adding a function here.
POLICIES: Mapping[str, Policy] = MappingProxyType(
    {
        "shortest_queue": shortest_queue,
        "lottery": lottery,
    }
)


def get_policy(name: str) -> Policy:
    """The policy called `name`; ValueError naming the known ones otherwise (for settings validation)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown dispatch policy {name!r}; choose one of {sorted(POLICIES)}") from None
