"""Eval and gates: candidate vs production on the comparison set, one `tailor eval` over both models, then the
token F1 of each set (corrected, held-out, regression) from predictions.jsonl, and the gates."""

from __future__ import annotations

from pathlib import Path

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.evaluate.gates import failed_gates, parse_gates
from tailor.improve.build import SETS
from tailor.workspace import read_jsonl, write_json

MODELS = ("production", "candidate")


def compare(config: TailorConfig, root: Path, production_run: Path, candidate_run: Path, eval_dir: Path, *,
            show_progress: bool) -> dict:
    from tailor.evaluate.harness import run_eval

    eval_config = config.eval.model_copy(update={"models": {"production": str(production_run),
                                                            "candidate": str(candidate_run)}, "limit": 0})
    report = run_eval(config.model_copy(update={"eval": eval_config}), root, eval_dir, show_progress=show_progress)
    scores: dict[str, dict[str, list[float]]] = {model: {name: [] for name in SETS} for model in MODELS}
    for _, row in read_jsonl(eval_dir / "eval" / "predictions.jsonl"):
        scores[row["model"]][row["source"].split(":", 1)[0]].append(row["token_f1"])
    by_set = {model: {name: (round(sum(values) / len(values), 4) if values else None)
                      for name, values in sets.items()} for model, sets in scores.items()}
    rest = {model: [v for name in ("heldout", "regression") for v in scores[model][name]] for model in MODELS}
    by_set_rest = {model: round(sum(values) / len(values), 4) if values else None for model, values in rest.items()}
    figures = {"token_f1": {model: {**by_set[model], "rest": by_set_rest[model],
                                    "all": report["models"][model]["token_f1"]} for model in MODELS},
               "questions": {name: len(scores["candidate"][name]) for name in SETS}}
    figures["corrected_gain"] = _change(by_set["production"]["corrected"], by_set["candidate"]["corrected"])
    figures["rest_change"] = _change(by_set_rest["production"], by_set_rest["candidate"])
    write_json(eval_dir / "comparison.json", figures)
    return {"figures": figures, "report": str(eval_dir / "eval" / "report.json")}


def _change(production: float | None, candidate: float | None) -> float | None:
    """candidate - production, None when either set had no questions."""
    return None if production is None or candidate is None else round(candidate - production, 4)


def check_gates(config: TailorConfig) -> None:
    """improve.fail_under / fail_over parsed before any work: a gate naming an unknown metric is one line, not a
    failure after an hour of training."""
    for key, specs, over in (("fail_under", config.improve.fail_under, False),
                             ("fail_over", config.improve.fail_over, True)):
        for spec in specs:
            try:
                parse_gates([] if over else [spec], [spec] if over else [], models=list(MODELS),
                            customized="candidate", eval_config=config.eval)
            except TailorError as exc:
                message = str(exc).split(": ", 1)[1] if str(exc).startswith("--fail-") else str(exc)
                raise TailorError(f"improve.{key} '{spec}': {message}") from None


def apply_gates(config: TailorConfig, figures: dict, report: dict) -> list[str]:
    """The gates the candidate fails, one line each; empty: it may go to the canary."""
    improve = config.improve
    failures = []
    gain, change = figures["corrected_gain"], figures["rest_change"]
    if gain is not None and gain < improve.min_gain:
        failures.append(f"improve.min_gain: token F1 on the corrected questions changed by {gain:+.3f} "
                        f"(at least {improve.min_gain:+.3f} needed)")
    if change is not None and change < -improve.max_regression:
        failures.append(f"improve.max_regression: token F1 on the held-out and regression questions dropped by "
                        f"{-change:.3f} (at most {improve.max_regression:.3f} allowed)")
    gates = parse_gates(improve.fail_under, improve.fail_over, models=list(MODELS), customized="candidate",
                        eval_config=config.eval)
    failures += [f"improve.{'fail_over' if gate.above else 'fail_under'}: {line}"
                 for gate, line in failed_gates(report, gates, config.eval)]
    return failures
