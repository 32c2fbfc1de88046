"""The API server's Prometheus metrics: what its clients saw, per model, and what failover did about the workers.

    lmfleet_api_requests_total{route, method, model, status}       counter (lmfleet.metrics; 429s and 503s included,
                                                                   499: the client left before an answer began)
    lmfleet_api_request_duration_seconds{route, model}             histogram: end to end, to the last byte
    lmfleet_api_time_to_first_token_seconds{model}                 histogram: request parsed -> first token of a choice
    lmfleet_api_inter_token_latency_seconds{model}                 histogram: between a choice's tokens (a chunk of n
                                                                   tokens observes its gap / n once)
    lmfleet_api_prompt_tokens_total{model}, _completion_tokens_total{model}   counters, as `usage` counts them
    lmfleet_api_retries_total{model, reason}                       counter: a choice moved to another worker before
                                                                   its first chunk; reason queue_full | worker_error
    lmfleet_api_resumes_total{model}                               counter: a stream resumed on another worker
    lmfleet_api_worker_ejections_total                             counter: workers taken out of rotation
    lmfleet_api_workers{state}                                     gauge: healthy | ejected, in the cached view
    lmfleet_api_controller_up                                      gauge: 1 while a controller answers
    lmfleet_api_model_loads_total{model}                           counter: a worker came to hold the model
    lmfleet_api_model_unloads_total{model, reason}                 counter: a worker stopped holding it; reason admin
                                                                   (this server's admin route asked) | evicted
    lmfleet_api_model_load_seconds{model}                          histogram: each of those loads, its worker's timing
    lmfleet_api_model_workers{model, state}                        gauge: workers per state (loaded, loading, unloaded,
                                                                   failed) in the cached view
    lmfleet_api_model_memory_bytes{model}                          gauge: memory the workers say it holds

The model counters count the changes this server sees between two refreshes of its view (lmfleet.placement), so a
load and an unload within one refresh interval go unseen; each worker's own /metrics counts every one.

`model` is always a model some worker serves (the route sets it only then), never what a client typed.
Does not own: when these move (lmfleet.api.upstream, lmfleet.api.routing, lmfleet.api.answer call in), the
request timer behind the first two (lmfleet.metrics).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from lmfleet.api.routing import Router
from lmfleet.metrics import LATENCY_BUCKETS, live
from lmfleet.placement import ModelEvent, report_of, state_of
from lmfleet.protocol.openai import Usage

# Inter-token gaps: ~1 ms on a fast GPU up to a CPU under load.
# Model loads: a small GGUF from the page cache in a fraction of a second up to a large model from a slow disk.
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.ttft = Histogram(
            "lmfleet_api_time_to_first_token_seconds",
            "Time from the parsed request to the first token of a choice",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "lmfleet_api_inter_token_latency_seconds",
            "Time between two tokens of a choice",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "lmfleet_api_prompt_tokens", "Prompt tokens, as usage counts them", ["model"], registry=registry
        )
        self.completion_tokens = Counter(
            "lmfleet_api_completion_tokens", "Completion tokens, as usage counts them", ["model"], registry=registry
        )
        self.retries = Counter(
            "lmfleet_api_retries",
            "Choices moved to another worker before their first chunk",
            ["model", "reason"],
            registry=registry,
        )
        self.resumes = Counter("lmfleet_api_resumes", "Streams resumed on another worker", ["model"], registry=registry)
        self.ejections = Counter("lmfleet_api_worker_ejections", "Workers taken out of rotation", registry=registry)
        self.model_loads = Counter(
            "lmfleet_api_model_loads", "Loads seen: a worker came to hold the model", ["model"], registry=registry
        )
        self.model_unloads = Counter(
            "lmfleet_api_model_unloads",
            "Unloads seen: a worker stopped holding the model (admin: asked here; evicted: otherwise)",
            ["model", "reason"],
            registry=registry,
        )
        self.model_load_seconds = Histogram(
            "lmfleet_api_model_load_seconds",
            "How long each load seen took, as the worker timed it",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.router: Router | None = None  # the lifespan's, while it runs
        live(registry, self._view)

    def usage(self, model: str, usage: Usage) -> None:
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.completion_tokens.labels(model).inc(usage.completion_tokens)

    def model_event(self, event: ModelEvent) -> None:
        """A load or unload the router saw (lmfleet.placement.Placement.observe)."""
        if event.kind == "load":
            self.model_loads.labels(event.model).inc()
            if event.seconds is not None:
                self.model_load_seconds.labels(event.model).observe(event.seconds)
        else:
            self.model_unloads.labels(event.model, "admin" if event.asked else "evicted").inc()

    def _view(self) -> Iterable[Metric]:
        """The cached view's gauges, read at every scrape."""
        router = self.router
        if router is None:
            return
        healthy = len(router.healthy())
        workers = GaugeMetricFamily("lmfleet_api_workers", "Workers in the cached view", labels=["state"])
        workers.add_metric(["healthy"], healthy)
        workers.add_metric(["ejected"], len(router.workers()) - healthy)
        yield workers
        up = float(bool(router.controller_up))
        yield GaugeMetricFamily("lmfleet_api_controller_up", "1 while a controller answers", value=up)
        states: dict[tuple[str, str], int] = {}
        memory: dict[str, int] = {}
        for info in router.workers():
            for name in info.status.model_names:
                key = (name, state_of(info.status, name))
                states[key] = states.get(key, 0) + 1
                report = report_of(info.status, name)
                memory[name] = memory.get(name, 0) + (report.memory_bytes if report is not None else 0)
        by_state = GaugeMetricFamily(
            "lmfleet_api_model_workers", "Workers per model and state", labels=["model", "state"]
        )
        for (name, state), n in sorted(states.items()):
            by_state.add_metric([name, state], n)
        yield by_state
        held = GaugeMetricFamily(
            "lmfleet_api_model_memory_bytes", "Memory the workers hold for a model", labels=["model"]
        )
        for name, n in sorted(memory.items()):
            held.add_metric([name], n)
        yield held


class ChoiceClock:
    """One choice's token timing and failover counts; a no-op without metrics (tests build backends bare)."""

    def __init__(self, metrics: ApiMetrics | None, model: str, started: float) -> None:
        self._metrics = metrics
        self._model = model
        self._last: float | None = None
        self._started = started
        self._resumed = False

    def tokens(self, n: int) -> None:
        if self._metrics is None or n <= 0:
            return
        now = time.monotonic()
        if self._last is None:
            self._metrics.ttft.labels(self._model).observe(now - self._started)
        elif not self._resumed:
            self._metrics.itl.labels(self._model).observe((now - self._last) / n)
        self._last, self._resumed = now, False

    def retry(self, queue_full: bool) -> None:
        if self._metrics is not None:
            self._metrics.retries.labels(self._model, "queue_full" if queue_full else "worker_error").inc()

    def resume(self) -> None:
        """The choice moves to another worker: the gap until its next token is failover, not inter-token latency."""
        if self._metrics is not None:
            self._metrics.resumes.labels(self._model).inc()
        self._resumed = True
