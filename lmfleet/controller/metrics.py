"""The controller's Prometheus metrics: the fleet as its registry sees it, and its dispatch decisions.

    lmfleet_controller_workers{model, state}                 gauge: live workers per model; state idle (nothing
                                                             running or waiting), busy (running), queueing (waiting)
    lmfleet_controller_worker_events_total{event}            counter: registered, re-registered, unregistered,
                                                             expired (no heartbeat within the expiry)
    lmfleet_controller_dispatch_total{policy, result}        counter: /get_worker_address answers; result worker | none

Read from the registry at scrape time (`watch`); the dispatch counter is moved by the route. Does not own the
route (lmfleet.metrics) or the registry (controller/registry.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from lmfleet import errors
from lmfleet.controller.registry import FleetRegistry
from lmfleet.metrics import live
from lmfleet.protocol.worker import WorkerStatus

STATES = ("idle", "busy", "queueing")
EVENTS = ("registered", "re-registered", "unregistered", "expired")


def state_of(status: WorkerStatus) -> str:
    if status.waiting:
        return "queueing"
    return "busy" if status.running or status.queue_length else "idle"


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, policy: str, workers: FleetRegistry) -> None:
        self.registry = registry
        self.dispatch = Counter(
            "lmfleet_controller_dispatch",
            "Dispatch decisions (/get_worker_address) by policy and result",
            ["policy", "result"],
            registry=registry,
        )
        self.policy = policy
        live(registry, lambda: _families(workers))

    def dispatched(self, found: bool) -> None:
        self.dispatch.labels(self.policy, "worker" if found else "none").inc()


def _families(registry: FleetRegistry) -> Iterable[Metric]:
    counts: dict[tuple[str, str], int] = {}
    try:
        infos = registry.all()
    except errors.LmfleetError:  # a shared registry not read yet (etcd down since start): no workers to count
        infos = []
    for info in infos:
        for model in info.status.model_names:
            for state in STATES:
                counts.setdefault((model, state), 0)
            counts[(model, state_of(info.status))] += 1
    workers = GaugeMetricFamily(
        "lmfleet_controller_workers", "Live workers by model and state", labels=["model", "state"]
    )
    for (model, state), n in sorted(counts.items()):
        workers.add_metric([model, state], n)
    yield workers
    events = CounterMetricFamily("lmfleet_controller_worker_events", "Worker registry events", labels=["event"])
    for event in EVENTS:
        events.add_metric([event], registry.events[event])
    yield events
