"""Decide a running canary: promote, roll back, or wait.

- Roll back when an alerting rule (deploy/prometheus/alerts.yml, evaluated as `tailor monitor check` does) fires for
  the candidate's series, or when the A/B test finds its up-rate significantly lower than production's.
- Promote when both sides have improve.min_canary_samples rated answers, Fisher's exact test on their thumbs up/down
  gives p < improve.significance, the candidate's up-rate is the higher one, and the gates held.
- Otherwise wait: the next run decides with more evidence.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.improve.collect import utc
from tailor.registry.tables import Canary


@dataclass
class Decision:
    outcome: str  # promoted, rolled_back, waiting
    reason: str
    ab: dict = field(default_factory=dict)
    alerts: list[dict] = field(default_factory=list)


def ab_counts(db_path: Path, canary: Canary) -> dict:
    """Thumbs on each side since the canary started, and Fisher's exact test between them."""
    from scipy import stats

    from tailor.serve.ab import report

    started = utc(canary.started_at).isoformat(timespec="seconds")
    try:
        rows = report(db_path, canary.name, since=started).get(canary.name, [])
    except TailorError:  # nothing served under the canary yet
        rows = []
    # per side: up, down, completions, rated (counts) and up_rate (a fraction, None with nothing rated)
    sides: dict[str, dict[str, Any]] = {"production": {"up": 0, "down": 0, "completions": 0},
                                        "candidate": {"up": 0, "down": 0, "completions": 0}}
    for row in rows:
        side = "candidate" if row["model"] == canary.served_name else "production" if row["model"] == canary.name \
            else None
        if side:
            sides[side] = {"up": row["up"], "down": row["down"], "completions": row["completions"]}
    for counts in sides.values():
        rated = counts["up"] + counts["down"]
        counts["rated"] = rated
        counts["up_rate"] = round(counts["up"] / rated, 4) if rated else None
    a, b = sides["production"], sides["candidate"]
    p = None
    if a["rated"] and b["rated"]:
        p = float(stats.fisher_exact([[a["up"], a["down"]], [b["up"], b["down"]]]).pvalue)
    return {**sides, "fisher_p": p}


def firing_alerts(config: TailorConfig, root: Path, db_path: Path, canary: Canary) -> list[dict]:
    """Alerting rules firing for the candidate. With improve.monitor_url, every rule against that server's
    /metrics (thumbs from the feedback database); without, the rules on thumbs only, from the database."""
    from tailor.monitor.check import Scrape, ScrapeSource, check, scrape
    from tailor.monitor.rules import DEFAULT_RULES, check_metrics, load_rules

    improve = config.improve
    rules = load_rules(root / improve.monitor_rules if improve.monitor_rules else DEFAULT_RULES)
    if improve.monitor_url:
        from tailor.cli.monitor import metrics_url

        target = metrics_url(improve.monitor_url)
        last = scrape(target, os.environ.get("TAILOR_API_KEY"))
        check_metrics(rules, last.exported, target)
    else:
        # no server to scrape: every rule but those on thumbs (read from the database) has no data
        last = Scrape({"tailor_start_time_seconds": {(): time.time() - 1}}, set(), time.time())
    rows = check(rules, ScrapeSource(last, None, db_path))
    label = canary.served_name
    return [row.as_json() for row in rows if row.firing and f"model={label}" in row.series.split(",")]


def decide(config: TailorConfig, root: Path, db_path: Path, canary: Canary, gates_held: bool) -> Decision:
    improve = config.improve
    ab = ab_counts(db_path, canary)
    alerts = firing_alerts(config, root, db_path, canary)
    prod, cand, p = ab["production"], ab["candidate"], ab["fisher_p"]
    figures = (f"up-rate {canary.served_name} {_rate(cand)} ({cand['up']}/{cand['rated']}) vs {canary.name} "
               f"{_rate(prod)} ({prod['up']}/{prod['rated']})" + (f", Fisher p={p:.3g}" if p is not None else ""))
    if alerts:
        fired = "; ".join(f"{a['alert']} ({a['series']}: {a['value']:.3g}, {a['condition']})" for a in alerts)
        return Decision("rolled_back", f"monitor: {fired}; {figures}", ab, alerts)
    enough = min(prod["rated"], cand["rated"]) >= improve.min_canary_samples
    if enough and p is not None and p < improve.significance:
        if (cand["up_rate"] or 0) < (prod["up_rate"] or 0):
            return Decision("rolled_back", f"A/B: the candidate is worse, {figures} < {improve.significance}", ab)
        if not gates_held:
            return Decision("waiting", f"A/B significant ({figures}) but the gates did not hold", ab)
        return Decision("promoted", f"A/B: {figures} < {improve.significance}; gates held", ab)
    need = improve.min_canary_samples
    why = (f"{figures}; waiting for {need} rated answers each side" if not enough
           else f"{figures}; not significant at {improve.significance} yet")
    return Decision("waiting", why, ab)


def _rate(side: dict) -> str:
    return "-" if side["up_rate"] is None else f"{side['up_rate']:.0%}"
