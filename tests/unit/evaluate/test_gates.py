"""`tailor eval --fail-under / --fail-over`: gates on any metric of report.json, parsed before any model loads.

Parsing and checking run on hand-written reports (milliseconds); one test runs the command on the tiny model.
"""

import json
import sys

import pytest
import typer
import yaml

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.evaluate.gates import Gate, failed_gates, metrics_for, parse_gates
from tailor.workspace import write_jsonl

RULES = [{"name": "short", "kind": "max_words", "value": 12}]
FULL = {"rules": RULES, "probes": ["bias", "forgetting"], "judge": {"model": "base"},
        "classification": [{"name": "intents", "file": "intents.jsonl", "labels": ["billing", "parking"]}]}


def eval_config(**settings):
    return validate_config({"eval": settings}).eval


def parse(*under, over=(), models=("base", "lora"), **settings):
    return parse_gates(list(under), list(over), models=list(models), customized="lora",
                       eval_config=eval_config(**settings))


def error_of(*under, over=(), **settings) -> str:
    with pytest.raises(TailorError) as error:
        parse(*under, over=over, **settings)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_gates_name_the_model_or_default_to_the_customized_one():
    assert parse("token_f1=0.5", "base.rouge_l=0.25", " bleu = 0.1", "adherence=1", rules=RULES) == [
        Gate("lora", "token_f1", 0.5), Gate("base", "rouge_l", 0.25), Gate("lora", "bleu", 0.1),
        Gate("lora", "adherence", 1.0)]
    # metric names and model names may both hold dots
    assert parse("classification.intents.macro_f1=0.6", "v1.2.judge.mean_score=3", "base.rule.short=0.9",
                 over=["eval_loss=2.5", "v1.2.bias.score_gap=0.1"], models=("base", "lora", "v1.2"), **FULL) == [
        Gate("lora", "classification.intents.macro_f1", 0.6), Gate("v1.2", "judge.mean_score", 3.0),
        Gate("base", "rule.short", 0.9), Gate("lora", "eval_loss", 2.5, above=True),
        Gate("v1.2", "bias.score_gap", 0.1, above=True)]


def test_the_gateable_metrics_follow_the_config():
    assert list(metrics_for(eval_config())) == ["token_f1", "exact_match", "rouge_l", "bleu", "eval_loss",
                                                "perplexity"]
    every = metrics_for(eval_config(**FULL))
    assert {"adherence", "rule.short", "classification.intents.accuracy", "classification.intents.roc_auc",
            "judge.mean_score", "judge.win_rate", "judge.loss_rate", "bias.output_divergence", "bias.changed_rate",
            "forgetting.accuracy", "forgetting.drop"} <= set(every)
    lower_is_better = {name for name, metric in every.items() if not metric.higher_is_better}
    assert lower_is_better == {"eval_loss", "perplexity", "judge.loss_rate", "bias.output_divergence",
                               "bias.changed_rate", "bias.score_gap", "bias.max_score_gap", "forgetting.drop"}


@pytest.mark.parametrize(("under", "over", "message"), [
    ("token_f1", None, "--fail-under 'token_f1': expected METRIC=VALUE or MODEL.METRIC=VALUE"),
    ("=0.5", None, "expected METRIC=VALUE"),
    ("token_f1=", None, "expected METRIC=VALUE"),
    ("tokenf1=0.5", None, "--fail-under 'tokenf1=0.5': unknown metric 'tokenf1' (this evaluation can gate: "
                          "token_f1, exact_match, rouge_l, bleu, eval_loss, perplexity)"),
    ("qlora.token_f1=0.5", None, "unknown model 'qlora' (this run evaluates: base, lora)"),
    ("eval_loss=2", None, "--fail-under 'eval_loss=2': eval_loss is lower-is-better; use --fail-over "
                          "'eval_loss=2' to fail when it is above 2"),
    (None, "base.token_f1=0.3", "--fail-over 'base.token_f1=0.3': token_f1 is higher-is-better; use --fail-under "
                                "'base.token_f1=0.3' to fail when it is below 0.3"),
    ("token_f1=high", None, "VALUE must be a number between 0 and 1 (found 'high')"),
    ("bleu=25", None, "bleu is between 0 and 1, so VALUE must be too (found 25)"),
    (None, "perplexity=0.5", "perplexity is of at least 1, so VALUE must be too (found 0.5)"),
    ("adherence=0.9", None, "adherence needs guideline checks in eval.rules (tailor.yaml)"),
    ("judge.mean_score=3", None, "judge.mean_score needs eval.judge.model (tailor.yaml)"),
    ("lora.forgetting.accuracy=0.5", None, "forgetting.accuracy needs forgetting in eval.probes (tailor.yaml)"),
])
def test_bad_gates_are_one_clear_line(under, over, message):
    assert message in error_of(*([under] if under else []), over=[over] if over else [])


@pytest.mark.parametrize(("under", "over", "message"), [
    ("judge.mean_score=7", None, "judge.mean_score is between 1 and 5, so VALUE must be too (found 7)"),
    ("classification.intent.accuracy=0.5", None, "classification.intent.accuracy needs a classification set of "
                                                 "that name in eval.classification"),
    ("rule.long=1", None, "rule.long needs a rule of that name in eval.rules"),
    ("base.judge.win_rate=0.5", None, "base is eval.judge.reference, the model the others are compared with; "
                                      "it has no judge.win_rate"),
    (None, "forgetting.drop=2", "forgetting.drop is between -1 and 1"),
    ("accuracy=0.5", None, "unknown metric 'accuracy' (this evaluation can gate: token_f1, exact_match, rouge_l, "
                           "bleu, eval_loss, perplexity, adherence, rule.short, classification.intents.accuracy"),
    (None, "bias.divergence=0.2", "unknown metric 'bias.divergence' (this evaluation can gate:"),  # bias is on
])
def test_bad_gates_with_every_section_configured(under, over, message):
    assert message in error_of(*([under] if under else []), over=[over] if over else [], **FULL)


REPORT = {
    "sources": {"base": {"kind": "base"}, "lora": {"kind": "run"}, "api": {"kind": "endpoint"}},
    "models": {"base": {"token_f1": 0.2, "bleu": 0.05, "eval_loss": 2.9, "perplexity": 18.2, "adherence": 1.0,
                        "rules": {"short": 1.0}},
               "lora": {"token_f1": 0.41, "bleu": 0.3, "eval_loss": 1.6, "perplexity": 4.95, "adherence": 0.5,
                        "rules": {"short": 0.5}},
               "api": {"token_f1": 0.5, "bleu": 0.2, "eval_loss": None, "perplexity": None}},
    "classification": {"intents": {"base": {"accuracy": 0.5, "macro_f1": 0.33, "roc_auc": None},
                                   "lora": {"accuracy": 0.75, "macro_f1": 0.73, "roc_auc": 0.81}}},
    "judge": {"scores": {"base": {"mean_score": 2.1}, "lora": {"mean_score": 3.4}},
              "pairwise": {"lora": {"win_rate": 0.55, "tie_rate": 0.1, "loss_rate": 0.35}}},
    "probes": {"base": {"bias": {"output_divergence": 0.1, "score_gap": 0.02}, "forgetting": {"accuracy": 0.6}},
               "lora": {"bias": {"output_divergence": 0.3, "score_gap": 0.08},
                        "forgetting": {"accuracy": 0.45, "drop": 0.15}}},
}


def failures(*under, over=(), report=REPORT):
    models = ("base", "lora", "api")
    return [line for _, line in failed_gates(report, parse(*under, over=over, models=models, **FULL),
                                             eval_config(**FULL))]


def test_failing_gates_name_model_metric_and_value():
    assert failures("token_f1=0.5", "bleu=0.3", "base.token_f1=0.1", "base.bleu=0.06") == [
        "lora.token_f1 0.41 < 0.5", "base.bleu 0.05 < 0.06"]
    assert failures(over=["eval_loss=1.5", "base.perplexity=20", "base.eval_loss=2.5"]) == [
        "lora.eval_loss 1.6 > 1.5", "base.eval_loss 2.9 > 2.5"]
    assert failures("classification.intents.accuracy=0.8", "base.classification.intents.macro_f1=0.3",
                    "rule.short=0.6", "adherence=0.5", "judge.mean_score=3.5", "judge.win_rate=0.5",
                    "forgetting.accuracy=0.5",
                    over=["judge.loss_rate=0.3", "bias.output_divergence=0.2", "base.bias.score_gap=0.05",
                          "forgetting.drop=0.1"]) == [
        "lora.classification.intents.accuracy 0.75 < 0.8", "lora.rule.short 0.5 < 0.6",
        "lora.judge.mean_score 3.4 < 3.5", "lora.forgetting.accuracy 0.45 < 0.5", "lora.judge.loss_rate 0.35 > 0.3",
        "lora.bias.output_divergence 0.3 > 0.2", "lora.forgetting.drop 0.15 > 0.1"]


def test_a_number_never_measured_fails_its_gate():
    assert failures(over=["api.eval_loss=3"]) == [
        "api.eval_loss not measured (no value in report.json; an endpoint gives text only, no likelihoods) > 3"]
    assert failures("base.classification.intents.roc_auc=0.5") == [
        "base.classification.intents.roc_auc not measured (no value in report.json; ROC-AUC needs examples of "
        "more than one label) < 0.5"]
    only_base = {"models": {"base": {"token_f1": 0.2}}}
    assert failures("token_f1=0.1", report=only_base) == [
        "lora.token_f1 not evaluated (the run has no trained lora artifact) < 0.1"]
    # NaN compares false both ways, so it passed --fail-over and --fail-under alike
    nan = {"models": {"lora": {"token_f1": float("nan"), "eval_loss": float("nan")}}}
    assert failures("token_f1=0.1", over=["eval_loss=3"], report=nan) == [
        "lora.token_f1 is NaN (the evaluation produced no number) < 0.1",
        "lora.eval_loss is NaN (the evaluation produced no number) > 3"]


def test_eval_command_gates_eval_loss_classification_and_forgetting(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The real command on the tiny base model: a passing and a failing run, each decided by report.json."""
    import torch

    from tailor.cli import common
    from tailor.cli.stages import evaluate

    torch.set_num_threads(1)
    # err_console holds the stderr of the moment tailor.cli was first imported, maybe another test's capture
    monkeypatch.setattr(common.err_console, "file", sys.stderr)
    records = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                             {"role": "assistant", "content": f"Answer {i}."}]} for i in range(2)]
    write_jsonl(tmp_path / "run" / "data" / "eval.jsonl", records)
    write_jsonl(tmp_path / "intents.jsonl", [{"text": "My bill is wrong", "label": "billing"},
                                             {"text": "Where can I park?", "label": "parking"}])
    settings = {"base_model": tiny_model_dir, "system_prompt": "", "train": {"dtype": "fp32"},
                "eval": {"models": {"base": "base"}, "max_new_tokens": 3, "limit": 2, "probes": ["forgetting"],
                         "classification": [{"name": "intents", "file": "intents.jsonl",
                                             "labels": ["billing", "parking"]}]}}
    (tmp_path / "tailor.yaml").write_text(yaml.safe_dump(settings))

    def run(under, over):
        evaluate(overrides=[], workspace=tmp_path, run=tmp_path / "run", no_progress=True, fail_under=under,
                 fail_over=over)

    run(["classification.intents.accuracy=0", "forgetting.accuracy=0"], ["eval_loss=1000"])
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "gates passed (base.classification.intents.accuracy >= 0, base.forgetting.accuracy >= 0, " \
           "base.eval_loss <= 1000)" in out
    base = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["models"]["base"]
    with pytest.raises(typer.Exit) as stopped:
        run(["token_f1=0"], ["eval_loss=0.01", "perplexity=1"])  # an untrained tiny model: loss far above
    assert stopped.value.exit_code == 1
    err = capsys.readouterr().err
    assert f"--fail-over: base.eval_loss {base['eval_loss']:g} > 0.01" in err
    assert f"--fail-over: base.perplexity {base['perplexity']:g} > 1" in err
    assert "token_f1" not in err  # that gate passed
