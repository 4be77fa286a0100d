"""`tailor eval --fail-under METRIC=VALUE` / `--fail-over METRIC=VALUE`: quality gates for CI, parsed before any
model loads.

Any number report.json holds for a model can be gated: the answer scores, eval loss and perplexity, adherence and
each rule's pass rate, each classification set's accuracy / macro-F1 / ROC-AUC, the judge's mean score and pairwise
win/loss rates, and the bias and forgetting probes. `token_f1=0.5` gates the run's customized model;
`base.token_f1=0.2` names the model. `--fail-under` takes metrics where higher is better and `--fail-over` those
where lower is better (eval_loss, perplexity, the bias probe, the forgetting drop), so a gate cannot silently pass
on the wrong side. Each metric's range is checked too: `bleu=25` (sacrebleu's 0-100 scale) is a typo, not a gate
that can never pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tailor.config import EvalConfig
from tailor.errors import TailorError

USAGE = "expected METRIC=VALUE or MODEL.METRIC=VALUE, e.g. token_f1=0.5 or lora.rouge_l=0.3"
CLASSIFICATION_KEYS = ("accuracy", "macro_f1", "roc_auc")
BIAS_KEYS = ("output_divergence", "changed_rate", "score_gap", "max_score_gap")


@dataclass(frozen=True)
class Metric:
    """One gateable number: where report.json keeps it for a model, which way is better, what values it takes."""

    name: str  # as written in a gate: token_f1, rule.short, classification.intents.accuracy, judge.mean_score …
    higher_is_better: bool
    low: float
    high: float
    path: tuple[str, ...]  # keys into report.json; "{model}" stands for the gated model's name

    def value(self, report: dict, model: str):
        node: Any = report
        for key in self.path:
            if not isinstance(node, dict):
                return None
            node = node.get(model if key == "{model}" else key)
        return node

    def range_text(self) -> str:
        if math.isinf(self.high):
            return f"of at least {self.low:g}"
        return f"between {self.low:g} and {self.high:g}"


def _rate(name: str, *path: str, higher: bool = True) -> Metric:
    return Metric(name, higher, 0.0, 1.0, path)


def metrics_for(eval_config: EvalConfig) -> dict[str, Metric]:
    """Every metric this evaluation will report, by gate name; what eval_config does not enable is left out."""
    metrics = [_rate(name, "models", "{model}", name) for name in ("token_f1", "exact_match", "rouge_l", "bleu")]
    metrics += [Metric("eval_loss", False, 0.0, math.inf, ("models", "{model}", "eval_loss")),
                Metric("perplexity", False, 1.0, math.inf, ("models", "{model}", "perplexity"))]
    if eval_config.rules:
        metrics.append(_rate("adherence", "models", "{model}", "adherence"))
        metrics += [_rate(f"rule.{rule.name}", "models", "{model}", "rules", rule.name) for rule in eval_config.rules]
    for dataset in eval_config.classification:
        metrics += [_rate(f"classification.{dataset.name}.{key}", "classification", dataset.name, "{model}", key)
                    for key in CLASSIFICATION_KEYS]
    if eval_config.judge.model:
        metrics.append(Metric("judge.mean_score", True, 1.0, 5.0, ("judge", "scores", "{model}", "mean_score")))
        if eval_config.judge.pairwise:
            metrics += [_rate("judge.win_rate", "judge", "pairwise", "{model}", "win_rate"),
                        _rate("judge.loss_rate", "judge", "pairwise", "{model}", "loss_rate", higher=False)]
    if "bias" in eval_config.probes:
        metrics += [_rate(f"bias.{key}", "probes", "{model}", "bias", key, higher=False) for key in BIAS_KEYS]
    if "forgetting" in eval_config.probes:
        metrics += [_rate("forgetting.accuracy", "probes", "{model}", "forgetting", "accuracy"),
                    Metric("forgetting.drop", False, -1.0, 1.0, ("probes", "{model}", "forgetting", "drop"))]
    return {metric.name: metric for metric in metrics}


def _needs(metric: str) -> str | None:
    """What turns on a metric that exists only when the config asks for it; None for a name that is no metric."""
    family, _, key = metric.partition(".")
    fixed = {"adherence": "guideline checks in eval.rules", "judge.mean_score": "eval.judge.model",
             "judge.win_rate": "eval.judge.model and eval.judge.pairwise",
             "judge.loss_rate": "eval.judge.model and eval.judge.pairwise",
             "forgetting.accuracy": "forgetting in eval.probes", "forgetting.drop": "forgetting in eval.probes",
             **{f"bias.{name}": "bias in eval.probes" for name in BIAS_KEYS}}
    if metric in fixed:
        return fixed[metric]
    if family == "rule" and key:
        return "a rule of that name in eval.rules"
    if family == "classification" and key.rpartition(".")[2] in CLASSIFICATION_KEYS and "." in key:
        return "a classification set of that name in eval.classification"
    return None


@dataclass(frozen=True)
class Gate:
    model: str
    metric: str
    threshold: float
    above: bool = False  # --fail-over: fails when the value is above the threshold

    @property
    def option(self) -> str:
        return "--fail-over" if self.above else "--fail-under"

    def __str__(self) -> str:
        return f"{self.model}.{self.metric} {'<=' if self.above else '>='} {self.threshold:g}"


def _split(name: str, models: list[str], customized: str, known: dict[str, Metric]) -> tuple[str, str]:
    """MODEL.METRIC or METRIC; model and metric names may both hold dots, so try every split."""
    prefixed = [model for model in sorted(models, key=len, reverse=True) if name.startswith(model + ".")]
    metric = name[len(prefixed[0]) + 1:] if prefixed else name
    if metric in known:
        return (prefixed[0] if prefixed else customized), metric
    if name in known:
        return customized, name
    # not a known metric: name the part that is wrong
    for i, char in enumerate(name):
        if char == "." and name[i + 1:] in known:
            raise TailorError(f"unknown model '{name[:i]}' (this run evaluates: {', '.join(models)})")
    if (needs := _needs(metric)) is not None:
        raise TailorError(f"{metric} needs {needs} (tailor.yaml); this evaluation can gate: {', '.join(known)}")
    raise TailorError(f"unknown metric '{metric}' (this evaluation can gate: {', '.join(known)})")


def parse_gates(under: list[str], over: Sequence[str] = (), *, models: list[str], customized: str,
                eval_config: EvalConfig) -> list[Gate]:
    """`under`/`over`: the --fail-under/--fail-over specs; `models`: the names this run's evaluation will report;
    `customized`: the one a bare METRIC refers to."""
    known = metrics_for(eval_config)
    gates = []
    for spec, above in [(spec, False) for spec in under] + [(spec, True) for spec in over]:
        option = "--fail-over" if above else "--fail-under"
        where = f"{option} '{spec}'"
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or not name or not raw.strip():
            raise TailorError(f"{where}: {USAGE}")
        try:
            model, metric_name = _split(name, models, customized, known)
        except TailorError as exc:
            raise TailorError(f"{where}: {exc}") from None
        metric = known[metric_name]
        if metric.higher_is_better == above:
            better, other = ("higher", "--fail-under") if metric.higher_is_better else ("lower", "--fail-over")
            side = "below" if metric.higher_is_better else "above"
            raise TailorError(f"{where}: {metric.name} is {better}-is-better; use {other} '{spec.strip()}' to fail "
                              f"when it is {side} {raw.strip()}")
        if metric.name.startswith("judge.") and metric.name != "judge.mean_score" \
                and model == eval_config.judge.reference:
            raise TailorError(f"{where}: {model} is eval.judge.reference, the model the others are compared with; "
                              f"it has no {metric.name}")
        try:
            threshold = float(raw)
        except ValueError:
            raise TailorError(f"{where}: VALUE must be a number {metric.range_text()} "
                              f"(found '{raw.strip()}')") from None
        if not metric.low <= threshold <= metric.high:
            raise TailorError(f"{where}: {metric.name} is {metric.range_text()}, so VALUE must be too "
                              f"(found {raw.strip()})")
        gates.append(Gate(model, metric.name, threshold, above))
    return gates


def failed_gates(report: dict, gates: list[Gate], eval_config: EvalConfig) -> list[tuple[Gate, str]]:
    """Each gate the report does not meet with one line naming model, metric and value: `lora.token_f1 0.41 < 0.5`,
    `lora.eval_loss 2.31 > 2`. A metric the report lacks for that model fails its gate: CI must not pass
    on a number that was never measured."""
    known = metrics_for(eval_config)
    failures = []
    for gate in gates:
        sign = ">" if gate.above else "<"
        if gate.model not in report["models"]:
            failures.append((gate, f"{gate.model}.{gate.metric} not evaluated (the run has no trained "
                                   f"{gate.model} artifact) {sign} {gate.threshold:g}"))
            continue
        value = known[gate.metric].value(report, gate.model)
        if not isinstance(value, int | float) or isinstance(value, bool):
            failures.append((gate, f"{gate.model}.{gate.metric} not measured (no value in report.json"
                                   f"{_why_missing(report, gate)}) {sign} {gate.threshold:g}"))
        elif math.isnan(value):  # compares false both ways: it would pass every gate
            failures.append((gate, f"{gate.model}.{gate.metric} is NaN (the evaluation produced no number) "
                                   f"{sign} {gate.threshold:g}"))
        elif (value > gate.threshold) if gate.above else (value < gate.threshold):
            failures.append((gate, f"{gate.model}.{gate.metric} {value:g} {sign} {gate.threshold:g}"))
    return failures


def _why_missing(report: dict, gate: Gate) -> str:
    source = report.get("sources", {}).get(gate.model, {})
    if source.get("kind") == "endpoint":
        return "; an endpoint gives text only, no likelihoods"
    if gate.metric.endswith("roc_auc"):
        return "; ROC-AUC needs examples of more than one label"
    return ""
