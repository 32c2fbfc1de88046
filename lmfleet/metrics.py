"""Prometheus metrics, and the one request timer: what the controller, the workers and the API server share.

Owns
  * `new_registry()`: one `CollectorRegistry` per app, made by its `create_app`, so two apps in one process never
    collide and nothing lands in prometheus_client's global default registry;
  * `RequestTimer`: the one ASGI middleware that times every request, outside the other middleware so their
    refusals (401, 413, 503) count too, from its arrival (before its body is read) to the last byte of its
    answer, and records it (`TimedRequest`: route, method, model, status, duration, time to the first body byte)
    into each of its `RequestSink`s. The status is the one sent; a request that ended with nothing sent is 499
    (`CLIENT_CLOSED_REQUEST`: the client went away, mid-upload or before an answer began), one whose app raised
    before answering 500 (what Starlette then sends);
  * `install`: `GET /metrics` (Prometheus' text format) and the timer, with the Prometheus sink
    (`{part}_requests_total` by route, method, model and status; `{part}_request_duration_seconds`) and any
    other (the API server's dashboard, lmfleet.api.fleet);
  * `live`: a collector whose families are read from the process's state at scrape time (queues, workers);
  * the histogram buckets.

Labels are route templates (`/v1/models/{model:path}`; a path no route matches is `other`), methods, status codes
and the names of models the fleet serves (a route sets the model it served under `scope[MODEL_KEY]`): never a
prompt, a key or a secret, and never a value a client can vary without bound.

Does not own: what each part measures (lmfleet.api.metrics, lmfleet.worker.metrics, lmfleet.controller.metrics),
who may read /metrics (the API server's key gate; lmfleet.api.access).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

METRICS_PATH = "/metrics"
MODEL_KEY = "lmfleet.model"  # the scope key a route leaves the (served) model name under, for the labels
OTHER_ROUTE = "other"  # the route label of a path no route matches
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away": no client ever reads it

# Seconds: a streamed token (~10 ms on a GPU) up to a long answer on a CPU (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)  # tokens or sequences per step


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def add_metrics_route(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get(METRICS_PATH, include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _Live(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def live(registry: CollectorRegistry, collect: Callable[[], Iterable[Metric]]) -> None:
    """Register families that `collect()` reads from live state at every scrape (registered once, in `create_app`:
    `collect` yields nothing while the app's lifespan has not made that state)."""
    registry.register(_Live(collect))


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route that serves `scope` (a wrong method counts too: it is that route's 405)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return getattr(route, "path", OTHER_ROUTE)
    return OTHER_ROUTE


@dataclass(frozen=True)
class TimedRequest:
    """One request as the timer saw it."""

    route: str  # the template of the route that served it, or OTHER_ROUTE
    method: str
    model: str  # the served model it was for (`scope[MODEL_KEY]`), or ""
    status: int  # as sent; 499 when nothing was sent and nothing raised, 500 when the app raised first
    duration_s: float  # arrival to the last byte sent (or to the end, when nothing was)
    first_byte_s: float | None  # arrival to the first byte of the body; None when no body byte was sent


class RequestSink(Protocol):
    """Where the timer records requests. `request_started` is called at arrival, `request_done` once for each
    request started, whatever happened."""

    def request_started(self, route: str, method: str) -> None: ...

    def request_done(self, request: TimedRequest) -> None: ...


class RequestTimer:
    """Times every HTTP request into each sink (see the module docstring). A streamed answer is timed until its
    last byte."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute], sinks: Sequence[RequestSink]) -> None:
        self.app = app
        self.routes = routes  # the app's route list, read per request (routes added later are found)
        self.sinks = sinks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        route, method = route_of(self.routes, scope), scope["method"]
        status: int | None = None
        first_byte: float | None = None
        raised = False

        async def timed_send(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and first_byte is None:
                first_byte = time.monotonic() - started
            await send(message)

        for sink in self.sinks:
            sink.request_started(route, method)
        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            raised = True
            raise
        finally:
            if status is None:  # nothing was sent: Starlette answers a raise with a 500; else the client left
                status = 500 if raised else CLIENT_CLOSED_REQUEST
            done = TimedRequest(
                route=route,
                method=method,
                model=str(scope.get(MODEL_KEY, "")),
                status=status,
                duration_s=time.monotonic() - started,
                first_byte_s=first_byte,
            )
            for sink in self.sinks:
                sink.request_done(done)


class PrometheusRequests:
    """The timer's Prometheus sink: `{part}_requests_total{route, method, model, status}` and
    `{part}_request_duration_seconds{route, model}`."""

    def __init__(self, registry: CollectorRegistry, part: str) -> None:
        self.requests = Counter(
            f"{part}_requests_total",
            "HTTP requests by route template, method, model and status",
            ["route", "method", "model", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{part}_request_duration_seconds",
            "HTTP request time from arrival to the last byte of the answer, by route and model",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def request_started(self, route: str, method: str) -> None:
        """Counted when done."""

    def request_done(self, request: TimedRequest) -> None:
        self.requests.labels(request.route, request.method, request.model, str(request.status)).inc()
        self.duration.labels(request.route, request.model).observe(request.duration_s)


def install(app: FastAPI, registry: CollectorRegistry, *, part: str, sinks: Sequence[RequestSink] = ()) -> None:
    """`GET /metrics` and the request timer on `app`, recording into Prometheus and `sinks`; call it after the
    app's other middleware is added."""
    add_metrics_route(app, registry)
    everywhere = [PrometheusRequests(registry, part), *sinks]
    app.add_middleware(RequestTimer, routes=app.router.routes, sinks=everywhere)
