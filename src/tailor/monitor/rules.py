"""Prometheus alerting rules (deploy/prometheus/alerts.yml) read for `tailor monitor`: every `alert:` rule of every
group, its expression parsed into the subset promql.py evaluates. A rule outside the subset, or a file that is not a
Prometheus rule file, is one TailorError naming the file and the rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tailor.errors import TailorError
from tailor.monitor.promql import Alert, PromQLError, parse, parse_duration

# the rules shipped with tailor; `tailor monitor --rules` reads another file
DEFAULT_RULES = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "alerts.yml"


@dataclass(frozen=True)
class Rule:
    name: str
    expr: str
    alert: Alert
    where: str  # "alerts.yml: groups[0].rules[2] (TailorHighErrorRate)", for messages
    wait: float = 0.0  # the rule's `for:` in seconds; Prometheus waits this long before firing
    severity: str = "warning"
    summary: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def load_rules(path: Path | str) -> list[Rule]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TailorError(f"{path}: cannot read the rules file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise TailorError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise TailorError(f"{path}: a Prometheus rule file is a mapping with a 'groups' list")
    rules = []
    for g, group in enumerate(data["groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("rules"), list):
            raise TailorError(f"{path}: groups[{g}] needs a 'rules' list")
        for r, entry in enumerate(group["rules"]):
            if not isinstance(entry, dict) or "alert" not in entry:
                continue  # a recording rule: Prometheus' business, nothing to alert on
            where = f"{path}: groups[{g}].rules[{r}] ({entry['alert']})"
            expr = entry.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                raise TailorError(f"{where}: needs an 'expr'")
            try:
                alert = parse(expr)
                wait = parse_duration(str(entry["for"])) if entry.get("for") else 0.0
            except PromQLError as exc:
                raise TailorError(f"{where}: {exc} (tailor monitor evaluates the subset described in "
                                  f"tailor/monitor/promql.py)") from None
            labels = {str(k): str(v) for k, v in (entry.get("labels") or {}).items()}
            rules.append(Rule(name=str(entry["alert"]), expr=" ".join(expr.split()), alert=alert, where=where,
                              wait=wait, severity=labels.get("severity", "warning"),
                              summary=str((entry.get("annotations") or {}).get("summary", "")), labels=labels))
    if not rules:
        raise TailorError(f"{path}: no alerting rules (entries with 'alert:')")
    return rules


def check_metrics(rules: list[Rule], exported: set[str], origin: str) -> None:
    """Every metric a rule reads must be one the server exports: a typo would otherwise never fire."""
    for rule in rules:
        unknown = sorted(rule.alert.metrics - exported)
        if unknown:
            raise TailorError(f"{rule.where}: reads {', '.join(unknown)}, which {origin} does not export")
