"""Prometheus metrics: what the controller, the workers and the API server share.

Owns
  * `new_registry()`: one `CollectorRegistry` per app, made by its `create_app`, so two apps in one process never
    collide and nothing lands in prometheus_client's global default registry;
  * `RequestMetrics`: the ASGI middleware that counts every request by route, method, model and status and times
    it end to end (`{part}_requests_total`, `{part}_request_duration_seconds`);
  * `add_metrics_route`: `GET /metrics`, Prometheus' text format;
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


class RequestMetrics:
    """Counts and times every HTTP request; outside the other middleware, so their refusals (401, 413, 503) count
    too. A streamed answer is timed until its last byte."""

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute], requests: Counter, duration: Histogram) -> None:
        self.app = app
        self.routes = routes  # the app's route list, read per request (routes added later are found)
        self.requests = requests
        self.duration = duration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        route = route_of(self.routes, scope)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            model = str(scope.get(MODEL_KEY, ""))
            self.requests.labels(route, scope["method"], model, str(status)).inc()
            self.duration.labels(route, model).observe(time.monotonic() - started)


def install(app: FastAPI, registry: CollectorRegistry, *, part: str) -> None:
    """`GET /metrics` and the request metrics on `app`; call it after the app's other middleware is added."""
    requests = Counter(
        f"{part}_requests_total",
        "HTTP requests by route template, method, model and status",
        ["route", "method", "model", "status"],
        registry=registry,
    )
    duration = Histogram(
        f"{part}_request_duration_seconds",
        "HTTP request time from arrival to the last byte of the answer, by route and model",
        ["route", "model"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    add_metrics_route(app, registry)
    app.add_middleware(RequestMetrics, routes=app.router.routes, requests=requests, duration=duration)
