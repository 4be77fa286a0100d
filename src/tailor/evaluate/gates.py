"""`tailor eval --fail-under METRIC=VALUE`: quality gates for CI, parsed before any model loads.

`token_f1=0.5` gates the run's customized model; `base.token_f1=0.2` names the model. Only scores where higher is
better can be gated, all between 0 and 1, so `bleu=25` (sacrebleu's scale) is caught as a typo rather than a gate
that can never pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.errors import TailorError

GATED_METRICS = ("token_f1", "exact_match", "rouge_l", "bleu", "adherence")
LOWER_IS_BETTER = ("eval_loss", "perplexity")
USAGE = "expected METRIC=VALUE or MODEL.METRIC=VALUE, e.g. token_f1=0.5 or lora.rouge_l=0.3"


@dataclass(frozen=True)
class Gate:
    model: str
    metric: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.model}.{self.metric} >= {self.threshold:g}"


def parse_gates(specs: list[str], *, models: list[str], customized: str, has_rules: bool) -> list[Gate]:
    """`models`: the names this run's evaluation will report; `customized`: the one a bare METRIC refers to."""
    gates = []
    for spec in specs:
        where = f"--fail-under '{spec}'"
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or not name or not raw.strip():
            raise TailorError(f"{where}: {USAGE}")
        model, dot, metric = name.rpartition(".")
        model = model if dot else customized
        if metric in LOWER_IS_BETTER:
            raise TailorError(f"{where}: {metric} is lower-is-better; gates take scores where higher is better "
                              f"({', '.join(GATED_METRICS)})")
        if metric not in GATED_METRICS:
            raise TailorError(f"{where}: unknown metric '{metric}' (gates: {', '.join(GATED_METRICS)})")
        if model not in models:
            raise TailorError(f"{where}: unknown model '{model}' (this run evaluates: {', '.join(models)})")
        if metric == "adherence" and not has_rules:
            raise TailorError(f"{where}: adherence needs guideline checks in eval.rules (tailor.yaml)")
        try:
            threshold = float(raw)
        except ValueError:
            raise TailorError(f"{where}: VALUE must be a number between 0 and 1 (found '{raw.strip()}')") from None
        if not 0.0 <= threshold <= 1.0:
            raise TailorError(f"{where}: {metric} is between 0 and 1, so VALUE must be too (found {raw.strip()})")
        gates.append(Gate(model, metric, threshold))
    return gates


def failed_gates(report: dict, gates: list[Gate]) -> list[str]:
    """One line per gate the report does not meet, e.g. `lora.token_f1 0.41 < 0.5`."""
    failures = []
    for gate in gates:
        metrics = report["models"].get(gate.model)
        if metrics is None:
            failures.append(f"{gate.model}.{gate.metric} not evaluated (the run has no trained {gate.model} "
                            f"artifact) < {gate.threshold:g}")
        elif metrics[gate.metric] < gate.threshold:
            failures.append(f"{gate.model}.{gate.metric} {metrics[gate.metric]:g} < {gate.threshold:g}")
    return failures
