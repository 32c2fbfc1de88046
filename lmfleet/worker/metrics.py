"""The worker's Prometheus metrics: its engine's load and every step, in lmfleet's names and in the names the
Gateway API Inference Extension's endpoint picker (GIE, llm-d) scrapes from a model server.

    lmfleet_worker_requests_running / _waiting            gauges, {model}
    lmfleet_worker_kv_cache_usage_ratio                   gauge 0..1, {model}
    lmfleet_worker_kv_cache_tokens / _capacity_tokens     gauges, {model}
    lmfleet_worker_prefill_tokens_total, _decode_tokens_total, _preemptions_total      counters, {model}
    lmfleet_worker_prefix_cache_queries_total, _hits_total  counters, {model}: prompt tokens looked up in the
                                                          prefix cache, and of those found (vLLM's names)
    lmfleet_worker_prefix_cache_bytes                     gauge, {model, tier}: what the prefix cache's entries hold
                                                          in the KV cache (tier "kv") and in host memory ("host")
    lmfleet_worker_spec_draft_tokens_total, _spec_accepted_tokens_total  counters, {model} (speculative decoding:
                                                          drafted tokens and those accepted; their ratio is the
                                                          acceptance rate)
    lmfleet_worker_step_seconds, _step_prefill_tokens, _step_decode_tokens, _batch_size  histograms, {model}
    lmfleet_worker_model_load_seconds                     gauge, {model, engine}

GIE's model server protocol (docs/proposals/003-model-server-protocol), with vLLM's names, which its endpoint
picker reads by default:

    vllm:num_requests_waiting     gauge   TotalQueuedRequests
    vllm:num_requests_running     gauge   TotalRunningRequests
    vllm:kv_cache_usage_perc      gauge   KVCacheUtilization, a fraction 0..1 (vllm:gpu_cache_usage_perc: older name)
    vllm:lora_requests_info       gauge   value: now; labels max_lora, running_lora_adapters, waiting_lora_adapters
                                          (no LoRA adapters here: 0 and empty)
    vllm:cache_config_info        gauge   1; labels block_size ("1": a token), num_gpu_blocks (the capacity)

each labelled `model_name` (the first name the worker serves under), as vLLM labels them.

The gauges are read from the engine's last snapshot at scrape time; the step histograms are observed on the
engine thread (`on_step`, lmfleet.engine.runner). A multi-model worker (lmfleet.worker.multi) has `ModelMetrics`
instead: its models' loads, unloads and memory (each model's own engine metrics are its process's).

Does not own: the route (lmfleet.metrics), the engine's numbers
(lmfleet.engine.base.EngineStats).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from lmfleet.engine.base import EngineStats
from lmfleet.metrics import LATENCY_BUCKETS, TOKEN_BUCKETS, live
from lmfleet.protocol.worker import ModelState


class WorkerMetrics:
    """One per worker app, on its registry. `model` labels every series."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.registry = registry
        self.model = model
        self.load_seconds = Gauge(
            "lmfleet_worker_model_load_seconds",
            "Seconds the model took to load",
            ["model", "engine"],
            registry=registry,
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=registry).labels(model)

        self.step_seconds = histogram("lmfleet_worker_step_seconds", "Engine step time", LATENCY_BUCKETS)
        self.step_prefill = histogram(
            "lmfleet_worker_step_prefill_tokens", "Prompt tokens computed per step", TOKEN_BUCKETS
        )
        self.step_decode = histogram("lmfleet_worker_step_decode_tokens", "Tokens decoded per step", TOKEN_BUCKETS)
        self.batch_size = histogram("lmfleet_worker_batch_size", "Sequences running after each step", TOKEN_BUCKETS)
        self._last: EngineStats | None = None  # engine thread only
        self.stats: Callable[[], EngineStats] | None = None  # the running engine's, set by the lifespan
        live(registry, self._families)

    def on_step(self, seconds: float, stats: EngineStats) -> None:
        """After every engine step, on the engine thread."""
        last = self._last
        self._last = stats
        self.step_seconds.observe(seconds)
        self.batch_size.observe(stats.running)
        self.step_prefill.observe(stats.prefill_tokens - (last.prefill_tokens if last else 0))
        self.step_decode.observe(stats.decode_tokens - (last.decode_tokens if last else 0))

    def _families(self) -> Iterable[Metric]:
        """The engine's gauges and counters, read from its last snapshot at every scrape."""
        if self.stats is None:
            return
        s = self.stats()
        usage = s.kv_cache_usage or 0.0
        capacity = s.kv_capacity or 0

        def gauge(name: str, doc: str, value: float, label: str = "model") -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=[label])
            family.add_metric([self.model], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model"])
            family.add_metric([self.model], value)
            return family

        yield gauge("lmfleet_worker_requests_running", "Sequences in the running batch", s.running)
        yield gauge("lmfleet_worker_requests_waiting", "Requests admitted and waiting for the batch", s.waiting)
        yield gauge("lmfleet_worker_kv_cache_usage_ratio", "Fraction of the KV cache in use (0..1)", usage)
        yield gauge("lmfleet_worker_kv_cache_tokens", "Tokens held in the KV cache", s.tokens_in_flight)
        yield gauge("lmfleet_worker_kv_cache_capacity_tokens", "Tokens the KV cache can hold", capacity)
        yield counter("lmfleet_worker_prefill_tokens", "Prompt tokens computed", s.prefill_tokens)
        yield counter("lmfleet_worker_decode_tokens", "Tokens decoded", s.decode_tokens)
        yield counter("lmfleet_worker_preemptions", "Sequences preempted from a full KV cache", s.preemptions)
        yield counter(
            "lmfleet_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_queries
        )
        yield counter(
            "lmfleet_worker_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits
        )
        tiers = GaugeMetricFamily(
            "lmfleet_worker_prefix_cache_bytes",
            "Bytes the prefix cache's entries hold, per tier",
            labels=["model", "tier"],
        )
        tiers.add_metric([self.model, "kv"], s.prefix_cache_kv_bytes)
        tiers.add_metric([self.model, "host"], s.prefix_cache_host_bytes)
        yield tiers
        yield counter("lmfleet_worker_spec_draft_tokens", "Speculative tokens drafted", s.spec_draft_tokens)
        yield counter(
            "lmfleet_worker_spec_accepted_tokens", "Speculative tokens drafted and accepted", s.spec_accepted_tokens
        )
        # GIE's model server protocol, in vLLM's names
        yield gauge("vllm:num_requests_running", "Number of requests currently running", s.running, "model_name")
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed", s.waiting, "model_name")
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage", usage, "model_name")
        yield gauge(
            "vllm:gpu_cache_usage_perc", "KV-cache usage (older name). 1 means 100 percent", usage, "model_name"
        )
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests (none are served here)",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        lora.add_metric(["0", "", ""], time.time())
        yield lora
        cache = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the KV cache", labels=["block_size", "num_gpu_blocks"]
        )
        cache.add_metric(["1", str(capacity)], 1.0)
        yield cache


class ModelMetrics:
    """A multi-model worker's loads and unloads (lmfleet.worker.supervisor reports them; `states` is read at every
    scrape):

        lmfleet_worker_model_loads_total             counter, {model}
        lmfleet_worker_model_load_failures_total     counter, {model}
        lmfleet_worker_model_unloads_total           counter, {model, reason}: keep_alive, evicted (for another
                                                     model, or over the memory budget), requested, crashed, shutdown
        lmfleet_worker_model_load_seconds            gauge, {model, engine}: the last load
        lmfleet_worker_model_loaded                  gauge 0/1, {model}
        lmfleet_worker_model_memory_bytes            gauge, {model}: its process's resident memory
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.loads = Counter("lmfleet_worker_model_loads", "Models loaded", ["model"], registry=registry)
        self.load_failures = Counter(
            "lmfleet_worker_model_load_failures", "Model loads that failed", ["model"], registry=registry
        )
        self.unloads = Counter(
            "lmfleet_worker_model_unloads", "Models unloaded, by reason", ["model", "reason"], registry=registry
        )
        self.load_seconds = Gauge(
            "lmfleet_worker_model_load_seconds",
            "Seconds the model took to load",
            ["model", "engine"],
            registry=registry,
        )
        self.states: Callable[[], list[ModelState]] | None = None  # the supervisor's, set by the lifespan
        live(registry, self._families)

    def loaded(self, model: str, engine: str, seconds: float) -> None:
        self.loads.labels(model).inc()
        self.load_seconds.labels(model, engine).set(seconds)

    def load_failed(self, model: str) -> None:
        self.load_failures.labels(model).inc()

    def unloaded(self, model: str, reason: str) -> None:
        self.unloads.labels(model, reason).inc()

    def _families(self) -> Iterable[Metric]:
        if self.states is None:
            return
        loaded = GaugeMetricFamily("lmfleet_worker_model_loaded", "1 while the model is loaded", labels=["model"])
        memory = GaugeMetricFamily(
            "lmfleet_worker_model_memory_bytes", "Resident memory of the model's process", labels=["model"]
        )
        for m in self.states():
            loaded.add_metric([m.name], 1.0 if m.state == "loaded" else 0.0)
            memory.add_metric([m.name], m.memory_bytes)
        yield loaded
        yield memory
