"""LLM-as-judge: reading an endpoint judge's reply, and rubric and pairwise judging by the tiny model."""

import pytest
import torch

from tailor.evaluate.judge import pairwise, parse_choice, parse_score, rubric_scores


@pytest.mark.parametrize("reply, score", [("4", 4), ("Score: 5/5", 5), ("I'd say 3.6 overall", 4), ("9", 5),
                                          ("0 - wrong", 1), ("-2", 1), ("no idea", None), ("", None)])
def test_endpoint_scores_parse_and_clamp(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply, choice", [("A", "A"), ("Answer B is better.", "B"), (" b", None), ("AB", None)])
def test_endpoint_choice_parse(reply, choice):
    assert parse_choice(reply) == choice


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    from tailor.evaluate.sources import LocalModel
    from tailor.models.base import load_model, load_tokenizer

    return LocalModel("tiny", load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir), torch.float32)


ITEMS = [{"question": "When is the library open?", "reference": "9 am to 7 pm on weekdays.",
          "answer": "Weekdays from 9 am to 7 pm.", "other": "The pool opens at 6."},
         {"question": "How much is a parking permit?", "reference": "$45 per year.",
          "answer": "It costs $45 a year.", "other": "Call city hall."},
         {"question": "Where is city hall?", "reference": "400 Linden Avenue.",
          "answer": "At 400 Linden Avenue.", "other": "At 400 Linden Avenue."}]


def test_rubric_scores_are_whole_numbers_from_1_to_5(judge):
    summary, rows = rubric_scores(judge, ITEMS, "5 = correct, 1 = wrong.", batch_size=4)
    assert summary["n"] == 3 and summary["unparsed"] == 0  # a local judge picks among "1".."5": nothing to parse
    assert all(row["score"] in (1, 2, 3, 4, 5) for row in rows)
    assert all(1.0 <= row["expected_score"] <= 5.0 for row in rows)
    assert summary["mean_score"] == pytest.approx(sum(row["score"] for row in rows) / 3, abs=1e-4)
    assert sum(summary["histogram"].values()) == 3


def test_pairwise_asks_both_orders_and_reports_agreement(judge, monkeypatch):
    asked = []
    real = judge.option_logprobs

    def recording(conversations, options, **kwargs):
        asked.extend(c[-1]["content"] for c in conversations)
        return real(conversations, options, **kwargs)

    monkeypatch.setattr(judge, "option_logprobs", recording)
    summary, rows = pairwise(judge, ITEMS, batch_size=4)
    assert summary["judgements"] == 6 and len(asked) == 6
    for item, forward, backward in zip(ITEMS, asked[:3], asked[3:], strict=True):
        # the same two answers, swapped
        assert f"Answer A: {item['answer']}\nAnswer B: {item['other']}" in forward
        assert f"Answer A: {item['other']}\nAnswer B: {item['answer']}" in backward
    for row in rows:
        agreed = row["order_ab"] == row["order_ba"]
        assert row["verdict"] == (row["order_ab"] if agreed else "tie")
        assert 0.0 <= row["p_model_better"] <= 1.0
    assert summary["order_agreement"] == pytest.approx(sum(r["order_ab"] == r["order_ba"] for r in rows) / 3,
                                                       abs=1e-4)
    assert summary["win_rate"] + summary["tie_rate"] + summary["loss_rate"] == pytest.approx(1.0)


def test_position_bias_alone_gives_ties(judge, monkeypatch):
    # a judge that always prefers the first position never agrees with itself across orders
    monkeypatch.setattr(judge, "option_logprobs", lambda conversations, options, **kw: [[0.0, -5.0]
                                                                                        for _ in conversations])
    summary, rows = pairwise(judge, ITEMS, batch_size=4)
    assert summary["order_agreement"] == 0.0 and summary["tie_rate"] == 1.0
    assert all(row["p_model_better"] == pytest.approx(0.5) for row in rows)
