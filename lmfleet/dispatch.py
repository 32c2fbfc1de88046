"""Dispatch policies: given the live workers for a model, pick one. Policies are values, chosen by name.

A policy is a pure function `(workers, rng, affinity) -> WorkerInfo`: no I/O, no clock, no state beyond the `rng`
it is handed, so the same inputs and the same seed give the same pick. `affinity` says, per worker address, how
much of the request's prompt that worker probably holds in its prefix cache (`Affinity`; the API server works it
out, lmfleet.api.affinity; absent: nothing known). It belongs to neither side: the controller uses it for
`/get_worker_address` (with no affinity: it never sees a prompt), and the API server dispatches with it from its
cached `/workers` view (so it keeps serving while the controller is down). Keep it dependency-free (standard library
only at runtime).

    "shortest_queue"  the least load per unit of speed; ties broken at random, so idle replicas share
                      the traffic. Load is `max(queue_length, running + waiting)`: a FastChat worker only
                      reports `queue_length`; an lmfleet worker also reports the split, and among equal loads
                      the one with fewer *waiting* requests (free batch slots) wins.
    "lottery"         random, weighted by `speed` (FastChat's "lottery"), load ignored.
    "cache_aware"     (default) the worker that holds the longest part of the request's conversation
                      (`Affinity.matched`), the least loaded of those that hold as much, unless it is overloaded:
                      its load per unit of speed exceeds the least-loaded worker's by more than `BALANCE_ABS` *and*
                      by a factor above `BALANCE_REL` (SGLang's router tests the same two thresholds between the
                      most and the least loaded worker of the fleet; testing the chosen one is at least as strict);
                      then the least loaded. A request nobody holds (a new conversation) goes, among the workers not
                      overloaded, to the one this API server sent the fewest requests lately (`Affinity.recent`;
                      SGLang's router picks its smallest tree), then the least loaded: new conversations spread
                      over the replicas by what this server knows now, not by load reports a heartbeat old, and
                      stay there. A request with no affinity at all (no prompt to key: embeddings, scores, every
                      request the controller dispatches) is dispatched as shortest_queue does. The default since
                      scripts/bench_routing.py measured it (two SmolLM2 replicas, one and two API servers): as many
                      or more prompt tokens served from the prefix cache than shortest_queue in every run, every
                      later turn on its previous turn's replica, requests shared 50/50.

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
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # dispatch reads the fields of WorkerInfo; it needs no pydantic at runtime
    from lmfleet.protocol.worker import WorkerInfo, WorkerStatus


@dataclass(frozen=True)
class Affinity:
    """What a worker probably holds for one request: `matched`, how many characters of the request's prompt (its
    conversation so far, past the preamble every conversation shares) it was sent before; `recent`, how many requests
    the API server sent it lately (a count that decays with every dispatch: how busy its conversations keep it)."""

    matched: int = 0
    recent: float = 0.0


NO_AFFINITY: Mapping[str, Affinity] = MappingProxyType({})


class Policy(Protocol):
    def __call__(
        self, workers: Sequence[WorkerInfo], rng: random.Random, affinity: Mapping[str, Affinity] = ..., /
    ) -> WorkerInfo: ...


DEFAULT_POLICY = "cache_aware"
# cache_aware: a conversation leaves the worker holding it only when that worker holds more than BALANCE_ABS
# requests (per unit of speed) more than the least-loaded one, and more than BALANCE_REL times as many.
BALANCE_ABS = 4.0
BALANCE_REL = 1.5
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


def _queue(w: WorkerInfo) -> tuple[float, float]:
    """Load per unit of speed, then waiting requests per unit of speed (free batch slots win a tie)."""
    s = speed(w.status)
    return (load(w.status) / s, min(max(int(w.status.waiting), 0), _MAX_LOAD) / s)


def _least(
    workers: Sequence[WorkerInfo], rng: random.Random, key: Callable[[WorkerInfo], tuple[float, ...]]
) -> WorkerInfo:
    keys = [key(w) for w in workers]
    best = min(keys)
    return rng.choice([w for w, k in zip(workers, keys, strict=True) if k == best])


def shortest_queue(
    workers: Sequence[WorkerInfo], rng: random.Random, affinity: Mapping[str, Affinity] = NO_AFFINITY, /
) -> WorkerInfo:
    _require(workers)
    return _least(workers, rng, _queue)


def lottery(
    workers: Sequence[WorkerInfo], rng: random.Random, affinity: Mapping[str, Affinity] = NO_AFFINITY, /
) -> WorkerInfo:
    _require(workers)
    return rng.choices(list(workers), weights=[speed(w.status) for w in workers], k=1)[0]


def overloaded(load: float, least: float) -> bool:
    """cache_aware's balance rule: a worker with `load` (per unit of speed) is too busy to keep a conversation
    when the least-loaded worker has `least`."""
    return load - least > BALANCE_ABS and load > least * BALANCE_REL


def cache_aware(
    workers: Sequence[WorkerInfo], rng: random.Random, affinity: Mapping[str, Affinity] = NO_AFFINITY, /
) -> WorkerInfo:
    _require(workers)
    if not affinity:  # nothing is known of the request's prompt (none, or the controller): shortest_queue
        return _least(workers, rng, _queue)
    nothing = Affinity()
    matched = [affinity.get(w.address, nothing).matched for w in workers]
    longest = max(matched)
    least = min(_queue(w)[0] for w in workers)
    if longest > 0:
        holders = [w for w, m in zip(workers, matched, strict=True) if m == longest]
        chosen = _least(holders, rng, _queue)
        if not overloaded(_queue(chosen)[0], least):
            return chosen
        return _least(workers, rng, _queue)
    open_ = [w for w in workers if not overloaded(_queue(w)[0], least)]  # never empty: the least loaded is open
    return _least(open_, rng, lambda w: (affinity.get(w.address, nothing).recent, *_queue(w)))


# Read-only: the set of policies is fixed at import; add one by adding a function here.
POLICIES: Mapping[str, Policy] = MappingProxyType(
    {
        "shortest_queue": shortest_queue,
        "lottery": lottery,
        "cache_aware": cache_aware,
    }
)
AFFINITY_POLICIES = frozenset({"cache_aware"})  # those that read `affinity`: the API server works it out for them


def get_policy(name: str) -> Policy:
    """The policy called `name`; ValueError naming the known ones otherwise (for settings validation)."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown dispatch policy {name!r}; choose one of {sorted(POLICIES)}") from None
