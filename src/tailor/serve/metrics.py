"""Prometheus metrics of one server (`GET /metrics`): requests and errors by model, time to first token,
inter-token latency, generated tokens and throughput, and response-cache hits and misses.

Each app has its own registry, so two servers in one process (tests) do not share counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tailor_requests", "Completion requests answered, by model and endpoint.",
                                ["model", "endpoint"], registry=r)
        self.errors = Counter("tailor_errors", "Requests that failed, by model (or '-') and HTTP status.",
                              ["model", "status"], registry=r)
        self.time_to_first_token = Histogram("tailor_time_to_first_token_seconds",
                                             "From request to the first generated text.", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("tailor_inter_token_latency_seconds",
                                             "Between consecutive pieces of generated text.", ["model"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("tailor_generated_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.throughput = Histogram("tailor_tokens_per_second", "Completion tokens per second of one request.",
                                    ["model"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.cache_hits = Counter("tailor_cache_hits", "Answers served from the response cache.", registry=r)
        self.cache_misses = Counter("tailor_cache_misses", "Deterministic requests not in the response cache.",
                                    registry=r)
        self.speculation = Gauge("tailor_speculative_tokens", (
            "Speculative decoding since the engine started: steps that checked draft tokens (steps), draft tokens "
            "checked (drafted) and accepted (accepted)."), ["kind"], registry=r)

    def engine_figures(self, stats: dict) -> None:
        """Copy the engine's own counters (read at scrape time; an engine without them reports none)."""
        for kind, value in stats.get("speculation", {}).items():
            self.speculation.labels(kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
