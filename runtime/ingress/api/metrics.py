"""Prometheus metrics of the serving engine, in a CollectorRegistry of their own.

Names follow SGLang's (`sglang:` prefix), so dashboards built for SGLang work unchanged.
Latency histograms and token counters are observed by the HTTP layer as requests finish; the
scheduler's state (running / queued requests, token usage, cache hit rate) is read from
Frontend.replica_states() at scrape time: one sample per gauge, or with data-parallel replicas one per
replica, labelled dp_rank (as SGLang's per-DP-rank gauges).

Observations are plain integer/float updates on the event loop thread (prometheus-client's own
Histogram/Counter take a lock per call, several microseconds per request); one Collector turns
them into metric families when /metrics is scraped."""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from runtime.ingress.api.sequence import Sequence

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0,
                20.0, 25.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

# Frontend.replica_states() keys read at scrape time -> (metric name, help).
SCHEDULER_GAUGES = {
    "running": ("sglang:num_running_reqs", "Requests in the running batch"),
    "queued": ("sglang:num_queue_reqs", "Requests waiting in the scheduler's queue"),
    "token_usage": ("sglang:token_usage", "Fraction of the KV cache slots in use"),
    "cache_hit_rate": ("sglang:cache_hit_rate", "Prefix cache hit rate (cached / prompt tokens)"),
    "new_token_ratio": ("sglang:new_token_ratio", "Share of their token budget admission expects requests to use"),
}
SCHEDULER_COUNTERS = {
    "retractions": ("sglang:num_retractions", "Running requests sent back to the queue because the KV cache was full"),
}


class _Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def family(self, model_name: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            total += count
            cumulative.append((repr(bound) if bound != float("inf") else "+Inf", total))
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        family.add_metric([model_name], cumulative, self.sum)
        return family


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.ttft = _Histogram("sglang:time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.tpot = _Histogram("sglang:time_per_output_token_seconds", "Time per output token after the first",
                               TPOT_BUCKETS)
        self.e2e = _Histogram("sglang:e2e_request_latency_seconds", "End-to-end request latency", E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason type -> requests
        self.scheduler_states: list[dict] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_finished(self, sequence: Sequence) -> None:
        self.e2e.observe(sequence.finish_time - sequence.arrival)
        completion = sequence.completion_tokens
        if sequence.first_token_time is not None and completion > 1:
            self.tpot.observe((sequence.finish_time - sequence.first_token_time) / (completion - 1))
        self.prompt_tokens += sequence.prompt_tokens
        self.generation_tokens += completion
        self.cached_tokens += sequence.cached_tokens
        reason = sequence.finish.type
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self, replica_states: list[dict]) -> bytes:
        """The exposition text, with the scheduler gauges taken from each replica's server_info."""
        self.scheduler_states = replica_states
        return generate_latest(self.registry)

    def collect(self):
        """prometheus_client's Collector protocol."""
        labels = [self.model_name]
        for histogram in (self.ttft, self.tpot, self.e2e):
            yield histogram.family(self.model_name)
        for name, doc, value in (
                ("sglang:prompt_tokens", "Prompt tokens of finished requests", self.prompt_tokens),
                ("sglang:generation_tokens", "Generated tokens of finished requests", self.generation_tokens),
                ("sglang:cached_tokens", "Prompt tokens served from the prefix cache", self.cached_tokens)):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        family = CounterMetricFamily("sglang:num_requests", "Finished requests by finish reason",
                                     labels=["model_name", "finish_reason"])
        for reason, count in sorted(self.finished.items()):
            family.add_metric([self.model_name, reason], count)
        yield family
        per_replica = len(self.scheduler_states) > 1
        for table, kind in ((SCHEDULER_GAUGES, GaugeMetricFamily), (SCHEDULER_COUNTERS, CounterMetricFamily)):
            for key, (name, doc) in table.items():
                family = kind(name, doc, labels=["model_name", "dp_rank"] if per_replica else ["model_name"])
                for state in self.scheduler_states:
                    value = state.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        family.add_metric(labels + [str(state.get("dp_rank", 0))] if per_replica else labels, value)
                if family.samples:
                    yield family
