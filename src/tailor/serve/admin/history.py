"""The console's monitoring graphs: the server's own Prometheus counters (serve/metrics.py) read every few seconds
and kept for the last hour, so the graphs need no Prometheus. Each point of a graph covers the `window` of time
before it, as a `rate(x[5m])` would: a thumbs-down rate over the last five minutes, not over the last ten seconds,
in which there is rarely a thumb at all.

Counters start at zero when the server starts, so the first readings are measured from the start time."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from tailor.monitor.promql import histogram_quantile
from tailor.serve.metrics import ServerMetrics

Series = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)
KEEP = 360  # readings: an hour at the default serve.monitor_sample_seconds of 10
WINDOW = 300.0  # seconds each point covers
LATENCY = "tailor_request_duration_seconds_bucket"
FIRST_TOKEN = "tailor_time_to_first_token_seconds_bucket"

# what the console draws: name → (title, unit); the unit tells the page how to print a value
Unit = Literal["ratio", "seconds", "per_minute"]
SIGNALS: dict[str, tuple[str, Unit]] = {
    "answers_per_minute": ("Answers per minute", "per_minute"),
    "thumbs_down_rate": ("Thumbs-down rate", "ratio"),
    "abstention_rate": ("Abstention rate (grounded answers)", "ratio"),
    "retrieval_miss_rate": ("Retrieval miss rate (grounded requests)", "ratio"),
    "latency_p50_seconds": ("Answer latency p50", "seconds"),
    "latency_p95_seconds": ("Answer latency p95", "seconds"),
    "first_token_p95_seconds": ("Time to first token p95", "seconds"),
    "error_rate": ("Server errors (5xx share of responses)", "ratio"),
    "errors_per_minute": ("Failed requests (4xx and 5xx) per minute", "per_minute"),
    "blocked_inputs_per_minute": ("Blocked inputs per minute", "per_minute"),
    "injection_attempts_per_minute": ("Prompt-injection attempts per minute", "per_minute"),
    "rate_limited_per_minute": ("Rate-limited requests per minute", "per_minute"),
}


@dataclass(frozen=True)
class Reading:
    at: float  # Unix time
    values: dict[Series, float]


class MetricsHistory:
    def __init__(self, metrics: ServerMetrics, interval: float = 10.0, keep: int = KEEP, window: float = WINDOW):
        self.metrics, self.interval, self.window = metrics, interval, window
        self._readings: deque[Reading] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def read(self) -> Reading:
        values: dict[Series, float] = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return Reading(time.time(), values)

    def sample(self) -> Reading:
        """Take one reading and keep it."""
        reading = self.read()
        with self._lock:
            self._readings.append(reading)
        return reading

    async def run(self) -> None:
        """Take a reading every `interval` seconds until cancelled (the app starts this while it serves)."""
        while True:
            await asyncio.sleep(self.interval)
            self.sample()

    def series(self, model: str | None = None) -> dict:
        """{"times": [...], "signals": {name: [value or None, ...]}}: one point per kept reading plus one for now,
        each over the `window` before it; `model` keeps the series of that model only (the rate limit is counted
        per key, so its graph stays every key's)."""
        with self._lock:
            readings = [*self._readings, self.read()]
        start = Reading(readings[-1].values[("tailor_start_time_seconds", ())], {})  # every counter was zero then
        times: list[float] = []
        signals: dict[str, list[float | None]] = {name: [] for name in SIGNALS}
        for i, now in enumerate(readings):
            before = next((r for r in reversed(readings[:i]) if r.at <= now.at - self.window), start)
            for name, value in _signals(before, now, model).items():
                signals[name].append(None if value is None or math.isnan(value) else round(value, 6))
            times.append(round(now.at, 3))
        return {"times": times, "signals": signals}


def _total(reading: Reading, name: str, model: str | None, **wanted: str) -> float:
    total = 0.0
    for (sample, labels), value in reading.values.items():
        if sample != name:
            continue
        found = dict(labels)
        if model is not None and "model" in found and found["model"] != model:
            continue
        if all(found.get(label) == expected for label, expected in wanted.items()):
            total += value
    return total


def _quantile(before: Reading, now: Reading, name: str, model: str | None, q: float) -> float | None:
    grown: dict[float, float] = {}
    for (sample, labels), value in now.values.items():
        found = dict(labels)
        if sample != name or (model is not None and found.get("model") != model):
            continue
        bound = float(found["le"])
        grown[bound] = grown.get(bound, 0.0) + value - before.values.get((sample, labels), 0.0)
    if not grown or grown.get(math.inf, 0.0) <= 0:
        return None  # nothing answered in the window
    return histogram_quantile(q, list(grown.items()))


def _signals(before: Reading, now: Reading, model: str | None) -> dict[str, float | None]:
    def grown(name: str, **labels: str) -> float:
        return _total(now, name, model, **labels) - _total(before, name, model, **labels)

    def share(part: float, whole: float) -> float | None:
        return part / whole if whole > 0 else None

    minutes = max(now.at - before.at, 1e-9) / 60
    thumbs, grounded = grown("tailor_feedback_total"), grown("tailor_grounded_requests_total")
    rate_limited = _total(now, "tailor_rate_limited_total", None) - _total(before, "tailor_rate_limited_total", None)
    return {
        "answers_per_minute": grown("tailor_requests_total") / minutes,
        "thumbs_down_rate": share(grown("tailor_feedback_total", rating="down"), thumbs),
        "abstention_rate": share(grown("tailor_abstentions_total"), grounded),
        "retrieval_miss_rate": share(grown("tailor_retrieval_misses_total"), grounded),
        "latency_p50_seconds": _quantile(before, now, LATENCY, model, 0.5),
        "latency_p95_seconds": _quantile(before, now, LATENCY, model, 0.95),
        "first_token_p95_seconds": _quantile(before, now, FIRST_TOKEN, model, 0.95),
        "error_rate": share(grown("tailor_responses_total", code="5xx"), grown("tailor_responses_total")),
        "errors_per_minute": grown("tailor_errors_total") / minutes,
        "blocked_inputs_per_minute": grown("tailor_inputs_filtered_total", action="blocked") / minutes,
        "injection_attempts_per_minute": grown("tailor_prompt_injection_attempts_total") / minutes,
        "rate_limited_per_minute": rate_limited / minutes,
    }
