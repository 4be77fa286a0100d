"""`tailor monitor`: the alerting rules of deploy/prometheus/alerts.yml evaluated against a running server's
`/metrics` (and its feedback store), without Prometheus.

A rule's `rate(x[30m])` needs two points in time. Two ways to get them, both approximations of the window:

- `interval > 0`: two scrapes `interval` seconds apart; a range is the growth between them (a counter that went
  down was reset by a restart: its growth is its new value), whatever window the rule names;
- `interval == 0`: one scrape; a range is the total since the server started (`tailor_start_time_seconds`).

With a feedback database, `tailor_feedback_total` is counted from the database instead, over the rule's own window
(every row has its time), so the thumbs-down rate also covers feedback given before the server's last restart.

A rule's `for:` is not waited for (one evaluation cannot tell how long a condition has held): a rule whose condition
holds is reported as firing, and the table shows its `for:` so a scheduler running the check every few minutes can
page on repeated failures if it wants Prometheus' behaviour.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tailor.errors import TailorError
from tailor.monitor.promql import Labels, Range, evaluate
from tailor.monitor.rules import Rule
from tailor.serve.feedback import read_feedback_counts

# the sample names each metric type exposes (prometheus_client's text format)
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("_count", "_sum", "_created", ""), "gauge": ("",), "unknown": ("",), "info": ("_info",)}
FEEDBACK_METRIC = "tailor_feedback_total"


@dataclass
class Scrape:
    """One read of /metrics: every sample by name, and every name the server exports (with or without samples)."""

    samples: dict[str, dict[Labels, float]]
    exported: set[str]
    taken_at: float

    @classmethod
    def parse(cls, text: str, taken_at: float, origin: str) -> Scrape:
        samples: dict[str, dict[Labels, float]] = {}
        exported: set[str] = set()
        try:
            for family in text_string_to_metric_families(text):
                exported.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
                for sample in family.samples:
                    exported.add(sample.name)
                    samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        except ValueError as exc:
            raise TailorError(f"{origin}: not Prometheus metrics ({exc})") from None
        return cls(samples, exported, taken_at)


def scrape(url: str, api_key: str | None = None, timeout: float = 10.0) -> Scrape:
    """GET the metrics page; an unreachable server or a refused key is one TailorError naming the URL."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise TailorError(f"{url}: cannot read metrics ({exc.__class__.__name__}: {exc})") from None
    if response.status_code in (401, 403):
        raise TailorError(f"{url}: {response.status_code}; /metrics needs a key with the admin scope (--api-key or "
                          f"TAILOR_API_KEY)")
    if response.status_code != 200:
        raise TailorError(f"{url}: HTTP {response.status_code} ({response.text[:200]})")
    return Scrape.parse(response.text, time.time(), url)


class ScrapeSource:
    """Ranges measured between two scrapes, or (without `first`) since the server started; with `feedback_db`,
    the feedback counter comes from the database over the rule's own window."""

    def __init__(self, last: Scrape, first: Scrape | None = None, feedback_db: Path | None = None):
        self.last, self.first, self.feedback_db = last, first, feedback_db

    def seconds(self) -> float:
        if self.first is not None:
            return max(self.last.taken_at - self.first.taken_at, 1e-9)
        started = self.last.samples.get("tailor_start_time_seconds", {}).get((), None)
        if started is None:
            raise TailorError("the server exports no tailor_start_time_seconds: use --interval to measure rates "
                              "between two scrapes")
        return max(self.last.taken_at - started, 1e-9)

    def increase(self, range_: Range) -> tuple[dict[Labels, float], float]:
        if range_.metric == FEEDBACK_METRIC and self.feedback_db is not None:
            since = time.time() - range_.window
            counts = read_feedback_counts(self.feedback_db, since)
            return ({(("model", model), ("rating", rating)): float(n) for (model, rating), n in counts.items()},
                    range_.window)
        now = self.last.samples.get(range_.metric, {})
        if self.first is None:
            return dict(now), self.seconds()
        before = self.first.samples.get(range_.metric, {})
        # a counter lower than before was reset (the server restarted): all of it is new
        return ({labels: value - before.get(labels, 0.0) if value >= before.get(labels, 0.0) else value
                 for labels, value in now.items()}, self.seconds())


@dataclass
class Row:
    rule: Rule
    series: str  # "model=city" or "" for one series without labels, "-" when there is no data
    value: float | None
    firing: bool

    @property
    def state(self) -> str:
        return "firing" if self.firing else "no data" if self.value is None else "ok"

    def as_json(self) -> dict:
        return {"alert": self.rule.name, "severity": self.rule.severity, "series": self.series,
                "value": None if self.value is None or math.isnan(self.value) else self.value,
                "condition": self.rule.expr, "for": self.rule.wait, "summary": self.rule.summary,
                "labels": self.rule.labels, "state": self.state}


def check(rules: list[Rule], source: ScrapeSource) -> list[Row]:
    rows = []
    for rule in rules:
        values, firing = evaluate(rule.alert, source)
        if not values:
            rows.append(Row(rule, "-", None, False))
        for labels in sorted(values):
            rows.append(Row(rule, ",".join(f"{k}={v}" for k, v in labels), values[labels], labels in firing))
    return rows


def threshold(rule: Rule) -> str:
    first = rule.alert.conditions[0]
    return f"{first.op} {first.threshold:g}"


def post_webhook(url: str, rows: list[Row], server: str) -> None:
    """POST the firing alerts as JSON: {"server", "firing": [{alert, severity, series, value, ...}]}."""
    body = {"source": "tailor monitor", "server": server, "firing": [row.as_json() for row in rows if row.firing]}
    try:
        response = httpx.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"},
                              timeout=10)
    except httpx.HTTPError as exc:
        raise TailorError(f"--webhook {url}: cannot post the alerts ({exc.__class__.__name__}: {exc})") from None
    if response.status_code >= 300:
        raise TailorError(f"--webhook {url}: answered HTTP {response.status_code}")
