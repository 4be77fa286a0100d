"""A/B tests: an alias (say `city-bot`) served by several model versions by weight, and the report comparing them.

A caller always lands on the same version: the split hashes the alias and the caller (the request's `user`, else
the API key's name, else the client address) to a point in [0, 1) and walks the cumulative weights, so a user's
conversation never flips between versions and the shares converge to the weights over many users.
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
from pathlib import Path

from tailor.errors import TailorError


class AliasRouter:
    def __init__(self, aliases: dict[str, dict[str, float]], model_names: list[str]):
        self.aliases: dict[str, list[tuple[str, float]]] = {}
        for alias, weights in aliases.items():
            where = f"serve.aliases.{alias}"
            if alias in model_names:
                raise TailorError(f"{where}: '{alias}' is already a model's name; pick another alias")
            if not weights:
                raise TailorError(f"{where}: needs at least one model with a weight, e.g. {{lora: 0.9, base: 0.1}}")
            for model, weight in weights.items():
                if model not in model_names:
                    raise TailorError(f"{where}.{model}: no such model (this server has {', '.join(model_names)})")
                if not weight > 0 or math.isinf(weight):
                    raise TailorError(f"{where}.{model}: the weight must be a positive number (found {weight})")
            total = sum(weights.values())
            self.aliases[alias] = [(model, weight / total) for model, weight in weights.items()]
        self.canaries: set[str] = set()  # aliases named after the model they split (a canary beside production)

    def names(self) -> list[str]:
        """The aliases clients may name that are not also a model's own name."""
        return [alias for alias in self.aliases if alias not in self.canaries]

    def start_canary(self, name: str, candidate: str, share: float) -> None:
        """Send `share` of the users who ask for `name` to `candidate` (sticky per user, as any alias), the rest to
        `name` itself: clients keep asking for the same name while a new version is tried on a few of them."""
        self.aliases[name] = [(name, 1.0 - share), (candidate, share)]
        self.canaries.add(name)

    def end_canary(self, name: str) -> None:
        if name in self.canaries:
            self.aliases.pop(name, None)
            self.canaries.discard(name)

    def resolve(self, model: str, caller: str) -> tuple[str, str | None]:
        """(the model that answers, the alias asked for or None)."""
        split = self.aliases.get(model)
        if split is None:
            return model, None
        digest = hashlib.sha256(f"{model}\0{caller}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        for version, share in split:
            point -= share
            if point < 0:
                return version, model
        return split[-1][0], model  # rounding left a sliver past the last share

    def remove_model(self, model: str) -> None:
        """An adapter removed at runtime leaves the splits that used it; the others keep their relative weights."""
        for alias, split in list(self.aliases.items()):
            kept = [(m, w) for m, w in split if m != model]
            if not kept:
                del self.aliases[alias]
            else:
                total = sum(w for _, w in kept)
                self.aliases[alias] = [(m, w / total) for m, w in kept]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(db_path: Path | str, alias: str | None = None, since: str | None = None) -> dict:
    """Per version of each alias: completions, feedback, up-rate and latency; and each version against the
    alias's most-used one: Fisher's exact test on up/down counts, a two-proportion z-test, and Mann-Whitney U on
    latency. `since` (ISO 8601 UTC): only completions from then on (one canary of an alias used by several)."""
    from scipy import stats

    path = Path(db_path)
    if not path.is_file():
        raise TailorError(f"{path}: no feedback database (it is written by `tailor serve`, serve.feedback_db)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        rows = db.execute(
            "SELECT c.alias, c.model, c.id, c.latency_ms, c.first_token_ms, "
            "SUM(f.rating = 'up'), SUM(f.rating = 'down') FROM completions c LEFT JOIN feedback f "
            "ON f.response_id = c.id WHERE c.alias IS NOT NULL AND (? IS NULL OR c.alias = ?) AND c.created_at >= ? "
            "GROUP BY c.id", (alias, alias, since or "")).fetchall()
        db.close()
    except sqlite3.DatabaseError as exc:
        raise TailorError(f"{path}: cannot read the feedback database ({exc})") from None
    if alias is not None and not rows:
        raise TailorError(f"--alias: no completions were served under the alias '{alias}' in {path}")

    versions: dict[str, dict[str, dict]] = {}
    for alias_name, model, _, latency, first_token, ups, downs in rows:
        v = versions.setdefault(alias_name, {}).setdefault(model, {"completions": 0, "up": 0, "down": 0,
                                                                    "latency": [], "first_token": []})
        v["completions"] += 1
        v["up"] += ups or 0
        v["down"] += downs or 0
        if latency is not None:
            v["latency"].append(latency)
        if first_token is not None:
            v["first_token"].append(first_token)

    result = {}
    for alias_name, models in sorted(versions.items()):
        order = sorted(models, key=lambda m: -models[m]["completions"])
        control = models[order[0]]
        table = []
        for model in order:
            v = models[model]
            rated = v["up"] + v["down"]
            row = {"model": model, "completions": v["completions"], "feedback": rated, "up": v["up"],
                   "down": v["down"], "feedback_rate": rated / v["completions"],
                   "up_rate": v["up"] / rated if rated else None,
                   "latency_ms_p50": _quantile(v["latency"], 0.5), "latency_ms_p95": _quantile(v["latency"], 0.95),
                   "first_token_ms_p50": _quantile(v["first_token"], 0.5)}
            if model != order[0]:
                row["vs"] = order[0]
                row["fisher_p"] = _fisher(control, v, stats)
                row["z_test_p"] = _two_proportion_p(control, v, stats)
                row["latency_p"] = (float(stats.mannwhitneyu(control["latency"], v["latency"]).pvalue)
                                    if len(control["latency"]) > 1 and len(v["latency"]) > 1 else None)
            table.append(row)
        result[alias_name] = table
    return result


def _fisher(a: dict, b: dict, stats) -> float | None:
    if not (a["up"] + a["down"]) or not (b["up"] + b["down"]):
        return None
    return float(stats.fisher_exact([[a["up"], a["down"]], [b["up"], b["down"]]]).pvalue)


def _two_proportion_p(a: dict, b: dict, stats) -> float | None:
    """Two-sided p-value of 'the up-rates are equal', pooled standard error."""
    n1, n2 = a["up"] + a["down"], b["up"] + b["down"]
    if not n1 or not n2:
        return None
    pooled = (a["up"] + b["up"]) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (a["up"] / n1 - b["up"] / n2) / se
    return float(2 * stats.norm.sf(abs(z)))
