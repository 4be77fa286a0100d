import json
import math

import pytest

from tailor.config import validate_config
from tailor.evaluate.harness import run_eval
from tailor.evaluate.metrics import exact_match, normalize_answer, token_f1
from tailor.train.run import run_training
from tailor.workspace import write_jsonl


def test_normalization_follows_squad():
    assert normalize_answer("The Library, is OPEN!") == "library is open"


@pytest.mark.parametrize("prediction, reference, f1", [
    ("open 9 am to 7 pm", "open 9 am to 7 pm", 1.0),
    ("open 9 to 5", "open 9 am to 7 pm", 2 * (3 / 4) * (3 / 6) / (3 / 4 + 3 / 6)),  # 3 shared of 4 and 6
    ("closed", "open", 0.0),
    ("", "", 1.0),
    ("", "open", 0.0),
])
def test_token_f1_by_hand(prediction, reference, f1):
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_exact_match_ignores_case_punctuation_articles():
    assert exact_match("The permit costs $45.", "permit costs 45") == 1.0
    assert exact_match("The permit costs $46.", "permit costs 45") == 0.0


def chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_report_compares_base_and_tuned(tiny_model_dir, tmp_path):
    records = [chat(f"Question {i}?", f"Answer number {i}.") for i in range(6)]
    write_jsonl(tmp_path / "data" / "train.jsonl", records)
    write_jsonl(tmp_path / "data" / "eval.jsonl", records[:4])
    config = validate_config({"base_model": tiny_model_dir, "system_prompt": "",
                              "train": {"max_steps": 3, "batch_size": 2, "dtype": "fp32", "save_every": 0},
                              "eval": {"max_new_tokens": 6, "batch_size": 3}})
    run_training(config, tmp_path, tmp_path, show_progress=False)
    report = run_eval(config, tmp_path, tmp_path, show_progress=False)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["models"]) == {"base", "lora"}
    for metrics in saved["models"].values():
        assert {"token_f1", "exact_match", "eval_loss", "perplexity"} <= set(metrics)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-3)
    # training lowered the eval loss of the tuned model below the random base on the same records
    assert saved["models"]["lora"]["eval_loss"] < saved["models"]["base"]["eval_loss"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["model"] for r in rows} == {"base", "lora"}
    assert all(0.0 <= r["token_f1"] <= 1.0 for r in rows)
