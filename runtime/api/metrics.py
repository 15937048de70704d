"""Prometheus metrics of the serving engine, in a CollectorRegistry of their own.

Names follow SGLang's (`sglang:` prefix), so dashboards built for SGLang work unchanged.
Latency histograms and token counters are observed by the HTTP layer as requests finish; the
scheduler's state (running / queued requests, token usage, cache hit rate) is read from
Frontend.server_info() at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from runtime.api.generation import Sequence

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0,
                 20.0, 25.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

# Frontend.server_info() keys read at scrape time -> gauge.
SCHEDULER_GAUGES = {
    "num_running_reqs": ("sglang:num_running_reqs", "Requests in the running batch"),
    "num_queue_reqs": ("sglang:num_queue_reqs", "Requests waiting in the scheduler's queue"),
    "token_usage": ("sglang:token_usage", "Fraction of the KV cache slots in use"),
    "cache_hit_rate": ("sglang:cache_hit_rate", "Prefix cache hit rate (cached / prompt tokens)"),
}


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        self.ttft = histogram("sglang:time_to_first_token_seconds", "Time to first token", _TTFT_BUCKETS)
        self.tpot = histogram("sglang:time_per_output_token_seconds", "Time per output token after the first",
                              _TPOT_BUCKETS)
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "End-to-end request latency", _E2E_BUCKETS)
        self.prompt_tokens = counter("sglang:prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("sglang:generation_tokens", "Generated tokens of finished requests")
        self.cached_tokens = counter("sglang:cached_tokens", "Prompt tokens served from the prefix cache")
        self.finished = Counter("sglang:num_requests", "Finished requests by finish reason",
                                ["model_name", "finish_reason"], registry=self.registry)
        self._model_name = model_name
        self.scheduler = {
            key: Gauge(name, doc, labels, registry=self.registry).labels(model_name)
            for key, (name, doc) in SCHEDULER_GAUGES.items()
        }

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_finished(self, sequence: Sequence) -> None:
        e2e = sequence.finish_time - sequence.arrival
        self.e2e.observe(e2e)
        if sequence.first_token_time is not None and sequence.completion_tokens > 1:
            decode_s = sequence.finish_time - sequence.first_token_time
            self.tpot.observe(decode_s / (sequence.completion_tokens - 1))
        self.prompt_tokens.inc(sequence.prompt_tokens)
        self.generation_tokens.inc(sequence.completion_tokens)
        self.cached_tokens.inc(sequence.cached_tokens)
        self.finished.labels(self._model_name, sequence.finish.type).inc()

    def render(self, server_info: dict) -> bytes:
        for key, gauge in self.scheduler.items():
            value = server_info.get(key)
            if isinstance(value, (int, float)):
                gauge.set(value)
        return generate_latest(self.registry)
