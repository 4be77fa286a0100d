"""`tailor eval` on a tiny model: report.json's shape, per-example scores, rules, the HTML report and --fail-under.

One short training and one evaluation are shared by the module; the CLI tests call the command in-process.
"""

import json
import math
import re
import shutil

import pytest
import typer
import yaml

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.evaluate.harness import run_eval
from tailor.evaluate.metrics import corpus_bleu, rouge_l, sentence_bleu
from tailor.train.run import run_training
from tailor.workspace import write_jsonl

RULES = [{"name": "short", "kind": "max_words", "value": 3},
         {"name": "no-number-word", "kind": "must_not_contain", "value": "number"},
         {"name": "says-answer", "kind": "must_contain", "value": "answer"}]  # an untrained model rarely does


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    import torch

    torch.set_num_threads(1)  # unit tests share a small machine
    workspace = tmp_path_factory.mktemp("eval-workspace")
    run_dir = workspace / "run"
    records = [chat(f"Question {i}?", f"Answer number {i}.") for i in range(6)]
    write_jsonl(run_dir / "data" / "train.jsonl", records)
    write_jsonl(run_dir / "data" / "eval.jsonl", records[:4])
    settings = {"base_model": tiny_model_dir, "system_prompt": "",
                "train": {"max_steps": 3, "batch_size": 2, "dtype": "fp32", "save_every": 0, "eval_every": 1},
                "eval": {"max_new_tokens": 6, "batch_size": 3, "rules": RULES}}
    (workspace / "tailor.yaml").write_text(yaml.safe_dump(settings))
    config = validate_config(settings)
    run_training(config, workspace, run_dir, show_progress=False)
    report = run_eval(config, workspace, run_dir, show_progress=False)
    return workspace, run_dir, report


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]


def test_report_compares_base_and_tuned(evaluated):
    _, run_dir, report = evaluated
    saved = json.loads((run_dir / "eval" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["models"]) == {"base", "lora"} and saved["method"] == "lora"
    for metrics in saved["models"].values():
        assert {"token_f1", "exact_match", "rouge_l", "bleu", "eval_loss", "perplexity", "adherence"} <= set(metrics)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-3)
        assert set(metrics["rules"]) == {"short", "no-number-word", "says-answer"}
    # training lowered the eval loss of the tuned model below the random base on the same records
    assert saved["models"]["lora"]["eval_loss"] < saved["models"]["base"]["eval_loss"]
    assert "tok:none" in saved["bleu_signature"]


def test_per_example_scores_and_rules_are_saved(evaluated):
    _, run_dir, report = evaluated
    rows = read_rows(run_dir)
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "lora"}
    for row in rows:
        assert row["rouge_l"] == pytest.approx(rouge_l(row["prediction"], row["reference"]), abs=1e-4)
        assert row["bleu"] == pytest.approx(sentence_bleu(row["prediction"], row["reference"]), abs=1e-4)
        lowered = row["prediction"].lower()
        expected_broken = [name for name, ok in [("short", len(row["prediction"].split()) <= 3),
                                                 ("no-number-word", "number" not in lowered),
                                                 ("says-answer", "answer" in lowered)] if not ok]
        assert row["broken_rules"] == expected_broken
    for name, metrics in report["models"].items():
        mine = [r for r in rows if r["model"] == name]
        assert metrics["bleu"] == pytest.approx(corpus_bleu([r["prediction"] for r in mine],
                                                            [r["reference"] for r in mine]), abs=1e-4)
        assert metrics["adherence"] == pytest.approx(sum(not r["broken_rules"] for r in mine) / len(mine))
        assert metrics["rules"]["short"] == pytest.approx(
            sum("short" not in r["broken_rules"] for r in mine) / len(mine))


def test_html_report_is_self_contained(evaluated):
    _, run_dir, _ = evaluated
    page = (run_dir / "eval" / "report.html").read_text()
    # score bars and the loss curves, inline
    assert page.count('<img alt=\'score bars per model\' src="data:image/png;base64,') == 1
    assert page.count('<img alt=\'training and eval loss by step\' src="data:image/png;base64,') == 1
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    assert "rule: no-number-word" in page
    worst = page.split("Worst 10 answers of lora", 1)[1]
    lora_rows = [r for r in read_rows(run_dir) if r["model"] == "lora"]
    assert worst.count("<tr>") == 1 + len(lora_rows)  # header + every row (fewer than 10 here)
    assert all(f"<td>run/data/eval.jsonl:{line}</td>" in worst for line in range(1, len(lora_rows) + 1))
    assert not list((run_dir / "eval").glob(".*.tmp"))  # the atomic write left nothing behind


def test_html_report_names_files_relative_to_the_workspace(evaluated):
    workspace, run_dir, report = evaluated
    page = (run_dir / "eval" / "report.html").read_text()
    assert report["eval_file"] == str(run_dir / "data" / "eval.jsonl")  # report.json keeps where it read
    # the page is read on other machines and attached to tickets: no /tmp/pytest-.../ in it
    assert str(workspace) not in page and str(workspace.resolve()) not in page
    assert "<h1>Evaluation of run</h1>" in page
    assert "4 questions from run/data/eval.jsonl;" in page and "logged steps from run/metrics.jsonl." in page


def test_report_paths_outside_the_workspace_and_relative_sources_are_kept(tmp_path):
    from tailor.evaluate.report import render_html

    report = {"models": {"base": {"token_f1": 0.5, "exact_match": 0.0}}, "n_questions": 2, "created_at": "now",
              "eval_file": "/elsewhere/eval.jsonl", "sources": {}}
    rows = [{"model": "base", "source": source, "question": "Q?", "reference": "A.", "prediction": "A.",
             "token_f1": 0.5} for source in ("qa.jsonl:3", str(tmp_path / "run" / "data" / "eval.jsonl") + ":2")]
    page = render_html(report, rows, tmp_path / "run")
    assert "2 questions from /elsewhere/eval.jsonl;" in page
    assert "<td>qa.jsonl:3</td>" in page and "<td>run/data/eval.jsonl:2</td>" in page
    assert "No training log (run/metrics.jsonl)" in page


def test_fail_under_exits_with_one_line_per_failing_gate(evaluated, tmp_path, capsys, monkeypatch):
    import sys

    from tailor.cli import common
    from tailor.cli.stages import evaluate

    # err_console holds the stderr of the moment tailor.cli was first imported, maybe another test's capture
    monkeypatch.setattr(common.err_console, "file", sys.stderr)

    workspace, run_dir, _ = evaluated
    run_copy = shutil.copytree(run_dir, tmp_path / "run")
    with pytest.raises(typer.Exit) as stopped:
        evaluate(overrides=[], workspace=workspace, run=run_copy, no_progress=True,
                 fail_under=["base.token_f1=0", "exact_match=1", "adherence=1.0"])
    assert stopped.value.exit_code == 1
    out, err = capsys.readouterr()
    assert f"html report: {run_copy / 'eval' / 'report.html'}" in out
    lora = json.loads((run_copy / "eval" / "report.json").read_text())["models"]["lora"]
    expected = [f"lora.{m} {lora[m]:g} < 1" for m in ("exact_match", "adherence") if lora[m] < 1]
    assert "lora.exact_match 0 < 1" in expected, "a 3-step tiny model should not answer any question exactly"
    # (stderr also holds the weight-loading bars that the real `tailor` entry point silences)
    assert [line.removeprefix("--fail-under: ") for line in err.splitlines() if "fail-under" in line] == expected

    evaluate(overrides=["eval.limit=1"], workspace=workspace, run=run_copy, no_progress=True,
             fail_under=["token_f1=0", "base.bleu=0"])  # met: no exit
    assert "gates passed" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["token_f1", "lora.eval_loss=2", "full.token_f1=0.5", "bleu=25"])
def test_bad_fail_under_stops_before_any_model_loads(evaluated, monkeypatch, spec):
    from tailor.cli.stages import evaluate
    from tailor.evaluate import harness

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation started despite a bad --fail-under")

    monkeypatch.setattr(harness, "run_eval", must_not_run)
    workspace, run_dir, _ = evaluated
    with pytest.raises(TailorError, match=re.escape(f"--fail-under '{spec}'")):
        evaluate(overrides=[], workspace=workspace, run=run_dir, no_progress=True, fail_under=[spec])


# ---- several models side by side: base, this run, an exported folder and an endpoint; classification, judge, probes

@pytest.fixture(scope="module")
def compared(evaluated, tiny_model_dir, tmp_path_factory):
    import torch

    from tailor.models.export import export_run
    from tailor.serve.engine import Engine
    from tests.unit.helpers import start_server

    workspace, run_dir, _ = evaluated
    merged = export_run(run_dir, "merged", tmp_path_factory.mktemp("export") / "merged").folder
    engine = Engine(tiny_model_dir, dtype=torch.float32, max_new_tokens=8)
    server, url = start_server(engine)
    labelled = workspace / "intents.jsonl"
    write_jsonl(labelled, [{"text": f"Question {i}: my bin was missed", "label": ["trash", "permit", "bill"][i % 3]}
                           for i in range(6)])
    settings = yaml.safe_load((workspace / "tailor.yaml").read_text())
    settings["eval"].update({
        "limit": 3, "max_new_tokens": 4,
        "models": {"base": "base", "tuned": "run", "merged": str(merged), "remote": f"endpoint:{url}/v1#base"},
        "classification": [{"name": "intents", "file": "intents.jsonl", "labels": ["trash", "permit", "bill"]}],
        "judge": {"model": "base", "reference": "base"},
        "probes": ["bias", "forgetting"]})
    config = validate_config(settings)
    out = tmp_path_factory.mktemp("compared")
    shutil.copytree(run_dir, out / "run")
    try:
        report = run_eval(config, workspace, out / "run", show_progress=False)
    finally:
        server.should_exit = True
        engine.shutdown()
    return out / "run", report


def test_models_side_by_side(compared):
    run_dir, report = compared
    assert list(report["models"]) == ["base", "tuned", "merged", "remote"]
    assert report["sources"]["merged"]["kind"] == "export" and report["sources"]["remote"]["kind"] == "endpoint"
    assert report["method"] == "tuned"  # this run's model: the one a bare --fail-under metric gates
    # the merged export is the adapter folded into the base: the same model, the same loss
    assert report["models"]["merged"]["eval_loss"] == pytest.approx(report["models"]["tuned"]["eval_loss"], abs=1e-3)
    assert report["models"]["remote"]["eval_loss"] is None and report["models"]["remote"]["n"] == 3
    assert report["token_f1_gain"] == pytest.approx(
        report["models"]["tuned"]["token_f1"] - report["models"]["base"]["token_f1"], abs=1e-4)


def test_classification_judge_and_probes_in_the_report(compared):
    run_dir, report = compared
    intents = report["classification"]["intents"]
    assert set(intents) == {"base", "tuned", "merged"}  # an endpoint gives no label likelihoods
    assert any("remote" in note and "intents" in note for note in report["notes"])
    assert all(sum(map(sum, m["confusion_matrix"])) == 3 for m in intents.values())
    judge = report["judge"]
    assert set(judge["scores"]) == {"base", "tuned", "merged", "remote"}
    assert set(judge["pairwise"]) == {"tuned", "merged", "remote"}  # each against base, in both orders
    assert all(p["judgements"] == 6 for p in judge["pairwise"].values())
    probes = report["probes"]
    assert probes["tuned"]["forgetting"]["drop"] == pytest.approx(
        probes["base"]["forgetting"]["accuracy"] - probes["tuned"]["forgetting"]["accuracy"], abs=1e-4)
    assert "forgetting" not in probes["remote"] and probes["remote"]["bias"]["score_gap"] is None
    lines = (run_dir / "eval" / "judge.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 3 + 3 * 3  # rubric rows for 4 models, pairwise rows for 3
    page = (run_dir / "eval" / "report.html").read_text()
    for alt in ("confusion matrices of intents", "ROC curves of intents", "judge scores and pairwise verdicts",
                "probe results", "training and eval loss by step"):
        assert page.count(f"<img alt='{alt}' src=\"data:image/png;base64,") == 1, alt
    assert "forgetting: drop vs base" in page and "judge win rate vs base" in page


def test_bad_models_stop_before_any_model_loads(evaluated, monkeypatch, tmp_path):
    from tailor.models import base

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model loaded before the input was checked")

    monkeypatch.setattr(base, "load_model", must_not_load)
    workspace, run_dir, _ = evaluated
    settings = yaml.safe_load((workspace / "tailor.yaml").read_text())
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    closed = port.getsockname()[1]
    cases = [
        ({"models": {"base": "base", "far": f"endpoint:http://127.0.0.1:{closed}/v1#lora"}},
         f"eval.models.far: cannot reach http://127.0.0.1:{closed}/v1"),
        ({"models": {"x": "endpoint:127.0.0.1#m"}},
         "eval.models.x: 'endpoint:127.0.0.1#m': expected endpoint:URL#MODEL"),
        ({"models": {"gone": "no/such/folder"}}, "eval.models.gone: .*no/such/folder does not exist"),
        ({"models": {"empty": str(tmp_path)}}, "eval.models.empty: .* is neither a run folder"),
        ({"judge": {"model": "base", "reference": "nobody"}}, "eval.judge.reference: 'nobody' is not one of"),
    ]
    bad_set = tmp_path / "bad.jsonl"
    write_jsonl(bad_set, [{"text": "a", "label": "trash"}, {"text": "b", "label": "parking"}])
    cases.append(({"classification": [{"name": "s", "file": str(bad_set), "labels": ["trash", "bill"]}]},
                  re.escape(f"{bad_set}:2: label 'parking' is not in eval.classification.0.labels (trash, bill)")))
    for extra, message in cases:
        config = validate_config({**settings, "eval": {**settings["eval"], **extra}})
        with pytest.raises(TailorError, match=message):
            run_eval(config, workspace, run_dir, show_progress=False)
    port.close()
