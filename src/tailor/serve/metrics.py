"""Prometheus metrics of one server (`GET /metrics`): requests and errors by model, latency, time to first token,
inter-token latency, generated tokens and throughput, response-cache hits and misses, and the quality signals that
deploy/prometheus/alerts.yml and `tailor monitor` watch: thumbs up and down, abstentions and retrieval misses of
grounded models, filtered inputs and answers, prompt-injection attempts and rate-limit hits per key.

Labels stay bounded: `model` is a name this server serves (or `-`), `key` a key's name from the key file (never the
key), `reason` and `pattern` come from fixed lists in security.py and filters.py.

Each app has its own registry, so two servers in one process (tests) do not share counts."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tailor_requests", "Completion requests answered, by model and endpoint.",
                                ["model", "endpoint"], registry=r)
        self.errors = Counter("tailor_errors", "Requests that failed, by model (or '-') and HTTP status.",
                              ["model", "status"], registry=r)
        self.responses = Counter("tailor_responses", (
            "Every HTTP response, by model (or '-') and status class (2xx, 4xx, 5xx): the denominator of the error "
            "rate."), ["model", "code"], registry=r)
        self.latency = Histogram("tailor_request_duration_seconds",
                                 "From request to the last token of an answered completion (cache hits included).",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
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
        # quality signals; a cache hit repeats an answer already counted, so these count computed answers only
        self.feedback = Counter("tailor_feedback", "Thumbs up or down received, by the model that answered.",
                                ["model", "rating"], registry=r)
        self.grounded = Counter("tailor_grounded_requests", "Answers of grounded models (retrieval on).",
                                ["model"], registry=r)
        self.abstentions = Counter("tailor_abstentions", (
            "Grounded answers that abstained: the retrieval gate found nothing, or the model said the documents "
            "do not cover the question."), ["model"], registry=r)
        self.retrieval_misses = Counter("tailor_retrieval_misses", (
            "Grounded requests whose retrieval found nothing above the gate (retrieval.min_score / coverage)."),
            ["model"], registry=r)
        self.inputs_filtered = Counter("tailor_inputs_filtered", (
            "Client text refused (action=blocked: template marker, too long, too many messages) or cleaned "
            "(action=sanitized: control characters removed), by requested model and reason."),
            ["model", "action", "reason"], registry=r)
        self.outputs_filtered = Counter("tailor_outputs_filtered", (
            "Answers whose text the output filter changed (personal data redacted or a blocklist match)."),
            ["model"], registry=r)
        self.injection_attempts = Counter("tailor_prompt_injection_attempts", (
            "Client messages matching a prompt-injection pattern (serve/filters.py INJECTION_PATTERNS); counted, "
            "not refused."), ["model", "pattern"], registry=r)
        self.rate_limited = Counter("tailor_rate_limited", "Requests refused by a key's rate limit (429), by key name.",
                                    ["key"], registry=r)
        self.start_time = Gauge("tailor_start_time_seconds", "When this server started (Unix time).", registry=r)
        self.start_time.set(time.time())

    def answered(self, model: str, *, grounded: bool, retrieval_missed: bool, abstained: bool,
                 filtered: bool) -> None:
        """The quality signals of one computed answer."""
        if grounded:
            self.grounded.labels(model).inc()
            if retrieval_missed:
                self.retrieval_misses.labels(model).inc()
            if abstained:
                self.abstentions.labels(model).inc()
        if filtered:
            self.outputs_filtered.labels(model).inc()

    def engine_figures(self, stats: dict) -> None:
        """Copy the engine's own counters (read at scrape time; an engine without them reports none)."""
        for kind, value in stats.get("speculation", {}).items():
            self.speculation.labels(kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
