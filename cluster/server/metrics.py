"""Prometheus metrics of the HTTP server: per-model traffic and latency, plus the engines' own counters.

Traffic and latency are measured in the ingress, where a client's time is spent; queue, batch and slot
figures are read from every engine's `stats()` at scrape time and summed. The registry is our own, so
several servers in one process (tests) never collide and /metrics shows only raylora's series.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# stats() key -> (metric name, help, is a counter)
ENGINE_SERIES: dict[str, tuple[str, str, bool]] = {
    "num_waiting": ("raylora_num_requests_waiting", "Requests waiting to be scheduled.", False),
    "num_running": ("raylora_num_requests_running", "Requests in the running batch.", False),
    "num_free_blocks": ("raylora_kv_cache_free_blocks", "Free KV cache blocks.", False),
    "num_preemptions": ("raylora_preemptions", "Requests preempted for lack of KV cache.", True),
    "prefix_cache_queries": ("raylora_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", True),
    "prefix_cache_hits": ("raylora_prefix_cache_hits", "Prompt tokens found in the prefix cache.", True),
    "num_cached_blocks": ("raylora_kv_cache_cached_blocks", "KV cache blocks holding a cached prefix.", False),
    "slot_hits": ("raylora_lora_slot_hits", "Adapter requests that found their adapter in a slot.", True),
    "slot_misses": ("raylora_lora_slot_misses", "Adapter loads into a slot.", True),
    "slot_evictions": ("raylora_lora_slot_evictions", "Adapters evicted from a slot.", True),
    "lora_cpu_cache_hits": ("raylora_lora_cpu_cache_hits", "Slot loads served from the CPU cache.", True),
    "lora_cpu_cache_misses": ("raylora_lora_cpu_cache_misses", "Slot loads that read the adapter from disk.", True),
}


class EngineStatsCollector(Collector):
    """Renders the latest summed engine stats; the server refreshes them before each scrape."""

    def __init__(self) -> None:
        self.stats: dict[str, int] = {}
        self.num_engines = 0

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("raylora_engines", "Engine replicas that answered this scrape.", value=self.num_engines)
        for key, (name, documentation, is_counter) in ENGINE_SERIES.items():
            if key not in self.stats:
                continue
            family = CounterMetricFamily if is_counter else GaugeMetricFamily
            yield family(name, documentation, value=self.stats[key])


@dataclass
class ChoiceTimer:
    """Times one generated sequence: first token, then the gaps between tokens."""

    metrics: ServerMetrics
    model: str
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    num_tokens: int = 0

    def on_tokens(self, count: int) -> None:
        if count and self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.metrics.time_to_first_token.labels(self.model).observe(self.first_token_at - self.started)
        self.num_tokens += count
        self.metrics.generation_tokens.labels(self.model).inc(count)

    def finish(self) -> None:
        if self.first_token_at is not None and self.num_tokens > 1:
            per_token = (time.monotonic() - self.first_token_at) / (self.num_tokens - 1)
            self.metrics.time_per_output_token.labels(self.model).observe(per_token)


class ServerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # `_created` series double the output and no dashboard reads them
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "raylora_requests", "Generation requests by model and outcome (ok, or the HTTP status).",
            ["model", "status"], registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "raylora_prompt_tokens", "Prompt tokens of accepted requests.", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "raylora_generation_tokens", "Generated tokens.", ["model"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "raylora_time_to_first_token_seconds", "Time from request to its first generated token.",
            ["model"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "raylora_time_per_output_token_seconds", "Mean time between generated tokens of one sequence.",
            ["model"], buckets=TPOT_BUCKETS, registry=self.registry,
        )
        self.engine = EngineStatsCollector()
        self.registry.register(self.engine)

    def timer(self, model: str) -> ChoiceTimer:
        return ChoiceTimer(self, model)

    def render(self, engine_stats: list[dict[str, int]]) -> bytes:
        self.engine.stats = sum_stats(engine_stats)
        self.engine.num_engines = len(engine_stats)
        return generate_latest(self.registry)


def sum_stats(per_engine: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in per_engine:
        for key, value in stats.items():
            total[key] = total.get(key, 0) + int(value)
    return total

