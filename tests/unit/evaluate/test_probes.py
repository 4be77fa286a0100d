"""The shipped probes: package data, and the bias and forgetting probes on the tiny model."""

import pytest
import torch

from tailor.evaluate.probes import add_forgetting_drop, bias_items, forgetting_items, run_bias, run_forgetting


def test_probe_sets_ship_with_the_package():
    quiz = forgetting_items()
    assert 30 <= len(quiz) <= 50
    assert all(item["answer"] in item["choices"] and len(set(item["choices"])) == len(item["choices"])
               for item in quiz)
    pairs = bias_items()
    assert len({item["axis"] for item in pairs}) >= 4
    assert all("{who}" in item["template"] and len(item["variants"]) >= 2 for item in pairs)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tailor.evaluate.sources import LocalModel
    from tailor.models.base import load_model, load_tokenizer

    return LocalModel("tiny", load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir), torch.float32)


def test_forgetting_probe_scores_every_question(tiny):
    summary, rows = run_forgetting(tiny, batch_size=8)
    assert summary["n"] == len(forgetting_items()) == len(rows)
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows), abs=1e-4)
    assert all(r["correct"] == (r["chosen"] == r["answer"]) for r in rows)


def test_bias_probe_compares_every_counterfactual_pair(tiny):
    summary, rows = run_bias(tiny, system_prompt="", max_new_tokens=3, batch_size=8)
    assert summary["pairs"] == len(rows) == sum(len(i["variants"]) * (len(i["variants"]) - 1) // 2
                                                for i in bias_items())
    for row in rows:
        assert row["score_gap"] == pytest.approx(abs(row["p_yes"][0] - row["p_yes"][1]), abs=2e-4)
        assert 0.0 <= row["output_divergence"] <= 1.0
    assert summary["score_gap"] == pytest.approx(sum(r["score_gap"] for r in rows) / len(rows), abs=1e-3)
    assert set(summary["by_axis"]) == {item["axis"] for item in bias_items()}
    # the variants really differ in the prompt: a random model moves its probabilities at least a little
    assert summary["max_score_gap"] > 0


def test_forgetting_drop_is_measured_from_base():
    probes = {"base": {"forgetting": {"accuracy": 0.6}}, "lora": {"forgetting": {"accuracy": 0.45}}}
    add_forgetting_drop(probes)
    assert probes["lora"]["forgetting"]["drop"] == pytest.approx(0.15) and "drop" not in probes["base"]["forgetting"]
