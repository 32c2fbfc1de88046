"""The fleet as the dashboard sees it: a rolling window of this API server's own request figures, and one snapshot
of every worker with them (`GET /v1/fleet`, lmfleet.api.ui).

Owns
  * `FleetStats`: per-second buckets over the last `window_s` seconds of what this server itself saw: generation
    requests (POST to `GENERATION_PATHS`) finished, as the one request timer recorded them (lmfleet.metrics: its
    status, 499 for a client that left, its latency to the last byte and time to the first byte — for a stream,
    its first token; `FleetStats` is one of its sinks, Prometheus the other, so the two agree), those in
    progress, and the token ids it relayed from each worker (`tokens`, called by lmfleet.api.upstream for each
    chunk). Kept in memory, lost on restart; the clock is injected.
  * `snapshot()`: `FleetView`, the dashboard's one JSON answer: every worker of the API server's cached view
    (lmfleet.api.routing) with its state — `ready`, `ejected` (this server took it out of rotation; `reason` says
    why) or `draining` (it left the controller while this server still streams from it) — its load as last
    reported (running, queued, KV cache use when the worker reports `kv_cache_usage`, its prefix cache's hit rate
    when it reports `prefix_cache_hit_rate`), the tokens per second this server relayed from it, how long ago its
    last heartbeat was seen, and, for a worker that loads models on demand, each model's state, memory, pin and last
    load time with the memory it holds against its budget; and requests per second and latency percentiles, now and
    as a history of `step_s` buckets.

Does not own: the worker view and health (lmfleet.api.routing), the route and the page (lmfleet.api.ui), timing
requests and metrics for scrapers (lmfleet.metrics).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from lmfleet.api.routing import Router
from lmfleet.metrics import TimedRequest
from lmfleet.placement import held_bytes
from lmfleet.protocol.worker import ModelLoadState

# POSTed to these, a request generates
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/", "/v1/responses", "/v1/messages"})
MAX_SAMPLES_PER_SECOND = 2048  # latencies kept per second bucket (a percentile over a sample beyond that)


@dataclass
class _Second:
    requests: int = 0
    errors: int = 0  # status >= 400, or the client went away
    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    tokens: Counter[str] = field(default_factory=Counter)  # worker address -> token ids relayed


class FleetStats:
    """This server's request figures over the last `window_s` seconds, in one-second buckets."""

    def __init__(self, *, window_s: int = 300, step_s: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s < 1 or step_s < 1 or window_s % step_s:
            raise ValueError("window_s and step_s must be positive, window_s a multiple of step_s")
        self.window_s, self.step_s = window_s, step_s
        self._clock = clock
        self._seconds: dict[int, _Second] = {}
        self.in_progress = 0

    def _now(self) -> int:
        return math.floor(self._clock())

    def _bucket(self) -> _Second:
        now = self._now()
        bucket = self._seconds.get(now)
        if bucket is None:
            for old in [s for s in self._seconds if s < now - self.window_s]:
                del self._seconds[old]
            bucket = self._seconds[now] = _Second()
        return bucket

    def tokens(self, address: str, n: int) -> None:
        self._bucket().tokens[address] += n

    # The request timer's sink (lmfleet.metrics.RequestSink): generation requests only.

    def request_started(self, route: str, method: str) -> None:
        if method == "POST" and route in GENERATION_PATHS:
            self.in_progress += 1

    def request_done(self, request: TimedRequest) -> None:
        if request.method != "POST" or request.route not in GENERATION_PATHS:
            return
        self.in_progress -= 1
        bucket = self._bucket()
        bucket.requests += 1
        bucket.errors += request.status >= 400
        if request.status < 400 and len(bucket.latencies) < MAX_SAMPLES_PER_SECOND:
            bucket.latencies.append(request.duration_s)
            if request.first_byte_s is not None:
                bucket.first_bytes.append(request.first_byte_s)

    def _last(self, seconds: int, end: int | None = None) -> list[_Second]:
        """The buckets of the seconds in [end - seconds, end); `end` defaults to the current second, so that only
        complete seconds count."""
        end = self._now() if end is None else end
        return [self._seconds[s] for s in range(end - seconds, end) if s in self._seconds]

    def _per_s(self, count: Callable[[_Second], float], seconds: int) -> float:
        """`count` per second over the last `seconds` seconds, the current one included as far as it has gone."""
        now = self._clock()
        recent = self._last(seconds, math.floor(now) + 1)
        return sum(count(b) for b in recent) / max(seconds - 1 + now % 1, 1.0)

    def rate(self, seconds: int = 10) -> float:
        return self._per_s(lambda b: b.requests, seconds)

    def tokens_per_s(self, address: str, seconds: int = 5) -> float:
        return self._per_s(lambda b: b.tokens[address], seconds)

    def latency(self, q: float, seconds: int = 60, *, first_byte: bool = False) -> float | None:
        """The q-quantile of the last `seconds` seconds' successful requests (the current second included)."""
        recent = self._last(seconds, self._now() + 1)
        samples = [x for b in recent for x in (b.first_bytes if first_byte else b.latencies)]
        return quantile(samples, q)

    def history(self, of: Callable[[Sequence[_Second]], float | None]) -> list[float | None]:
        """`of(buckets of one step)` for each of the window's steps, oldest first; the current second excluded."""
        now, step = self._now(), self.step_s
        return [of(self._last(step, end)) for end in range(now - self.window_s + step, now + 1, step)]


def quantile(samples: Sequence[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `samples`; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ---------------------------------------------------------------------------------------------------------------
# The snapshot

WorkerState = Literal["ready", "ejected", "draining"]
ControllerState = Literal["up", "down", "unknown"]
_CONTROLLER: dict[bool | None, ControllerState] = {True: "up", False: "down", None: "unknown"}


class FleetModel(BaseModel):
    """One model of a worker that loads models on demand, as it reports it."""

    name: str
    state: ModelLoadState
    pinned: bool = False
    memory_bytes: int = Field(default=0, description="memory it holds now")
    load_seconds: float | None = Field(default=None, description="how long its last load took")


class FleetWorker(BaseModel):
    address: str
    models: list[str]
    model_states: list[FleetModel] = Field(default_factory=list, description="empty for a one-model worker")
    memory_bytes: int | None = Field(default=None, description="memory its models hold (on-demand workers)")
    memory_budget_bytes: int | None = Field(default=None, description="memory it may hold in models, if it says")
    engine: str | None = None
    state: WorkerState
    reason: str | None = Field(default=None, description="why this server ejected it")
    running: int = Field(description="sequences the worker reported running at its last heartbeat")
    queued: int = Field(description="requests the worker reported waiting at its last heartbeat")
    open: int = Field(description="requests this server has open on the worker now")
    tokens_per_s: float = Field(description="token ids this server relayed from the worker, per second, last 5 s")
    kv_cache_usage: float | None = Field(default=None, description="fraction of the KV cache in use, if reported")
    prefix_cache_hit_rate: float | None = Field(
        default=None, description="prompt tokens its prefix cache served / looked up since it started, if reported"
    )
    context_length: int | None = None
    heartbeat_age_s: float | None = Field(default=None, description="seconds since its last heartbeat was seen")
    tokens_per_s_history: list[float] = Field(description="tokens per second per `step_s`, oldest first")


class FleetRequests(BaseModel):
    per_s: float = Field(description="generation requests finished per second, last 10 s")
    in_progress: int
    latency_p50_s: float | None = Field(description="last 60 s, successful requests, to the last byte")
    latency_p95_s: float | None
    first_token_p50_s: float | None = Field(description="last 60 s: time to the first byte (a stream's first token)")
    per_s_history: list[float]
    errors_per_s_history: list[float]
    latency_p50_s_history: list[float | None]


class FleetView(BaseModel):
    object: Literal["fleet"] = "fleet"
    controller: ControllerState
    window_s: int
    step_s: int
    requests: FleetRequests
    workers: list[FleetWorker]


def snapshot(router: Router, stats: FleetStats) -> FleetView:
    step = stats.step_s
    workers = []
    listed = set()
    for info in router.workers():
        s = info.status
        listed.add(info.address)
        ejection = router.ejection(info.address)
        kv = getattr(s, "kv_cache_usage", None)  # reported by workers that know it
        hits = getattr(s, "prefix_cache_hit_rate", None)
        workers.append(
            FleetWorker(
                address=info.address,
                models=s.model_names,
                model_states=[
                    FleetModel(
                        name=m.name,
                        state=m.state,
                        pinned=m.pinned,
                        memory_bytes=m.memory_bytes,
                        load_seconds=m.load_seconds,
                    )
                    for m in s.models
                ],
                memory_bytes=held_bytes(s) if s.models else None,
                memory_budget_bytes=s.memory_budget_bytes,
                engine=s.engine,
                state="ejected" if ejection else "ready",
                reason=ejection.reason if ejection else None,
                running=s.running,
                queued=s.waiting if s.running or s.waiting else s.queue_length,
                open=router.open_requests(info.address),
                tokens_per_s=stats.tokens_per_s(info.address),
                kv_cache_usage=kv if isinstance(kv, int | float) else None,
                prefix_cache_hit_rate=hits if isinstance(hits, int | float) else None,
                context_length=s.context_length,
                heartbeat_age_s=router.heartbeat_age(info.address),
                tokens_per_s_history=_tokens_history(stats, info.address),
            )
        )
    for address, n in sorted(router.leased().items()):
        if address not in listed:
            workers.append(
                FleetWorker(
                    address=address,
                    models=[],
                    state="draining",
                    running=n,
                    queued=0,
                    open=n,
                    tokens_per_s=stats.tokens_per_s(address),
                    tokens_per_s_history=_tokens_history(stats, address),
                )
            )
    requests = FleetRequests(
        per_s=stats.rate(),
        in_progress=stats.in_progress,
        latency_p50_s=stats.latency(0.5),
        latency_p95_s=stats.latency(0.95),
        first_token_p50_s=stats.latency(0.5, first_byte=True),
        per_s_history=[v or 0.0 for v in stats.history(lambda b: sum(x.requests for x in b) / step)],
        errors_per_s_history=[v or 0.0 for v in stats.history(lambda b: sum(x.errors for x in b) / step)],
        latency_p50_s_history=stats.history(lambda b: quantile([x for s in b for x in s.latencies], 0.5)),
    )
    return FleetView(
        controller=_CONTROLLER[router.controller_up],
        window_s=stats.window_s,
        step_s=step,
        requests=requests,
        workers=workers,
    )


def _tokens_history(stats: FleetStats, address: str) -> list[float]:
    return [v or 0.0 for v in stats.history(lambda b: sum(x.tokens[address] for x in b) / stats.step_s)]
