"""Classification sets: metric functions against hand-computed values and scikit-learn's multi-class functions,
checks of the files before any model loads, and label scoring by likelihood on the tiny model."""

import json
import math

import pytest
import torch

from tailor.config import validate_config
from tailor.errors import TailorError
from tailor.evaluate.classification import classification_metrics, load_sets, score_set, softmax

LABELS = ["bill", "permit", "trash"]
GOLD = ["bill", "bill", "permit", "permit", "trash", "trash"]
# predicted (argmax): bill, permit, permit, permit, trash, bill
PROBS = [[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.1, 0.4]]


def test_metrics_by_hand():
    metrics = classification_metrics(GOLD, PROBS, LABELS)
    assert metrics["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    # bill: P 1/2 R 1/2; permit: P 2/3 R 1; trash: P 1 R 1/2
    per = metrics["per_class"]
    assert (per["bill"]["precision"], per["bill"]["recall"]) == (0.5, 0.5)
    assert (per["permit"]["precision"], per["permit"]["recall"]) == (pytest.approx(0.6667), 1.0)
    assert (per["trash"]["precision"], per["trash"]["recall"]) == (1.0, 0.5)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-4)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: true, columns: predicted
    # ROC-AUC of "trash" by hand: positives score 0.8 and 0.4, negatives 0.1, 0.1, 0.3, 0.1 -> every pair ranked right
    assert per["trash"]["roc_auc"] == 1.0
    # "bill": positives 0.7, 0.3; negatives 0.2, 0.1, 0.1, 0.5 -> 0.7 beats 4, 0.3 beats 3 of 4: 7/8
    assert per["bill"]["roc_auc"] == pytest.approx(7 / 8)
    assert metrics["roc_curves"]["bill"]["fpr"][0] == 0.0 and metrics["roc_curves"]["bill"]["tpr"][-1] == 1.0


def test_metrics_match_sklearn_multiclass():
    import numpy as np
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    gold = [LABELS[i] for i in rng.integers(0, 3, size=40)]
    probs = rng.dirichlet([1, 1, 1], size=40).tolist()
    metrics = classification_metrics(gold, probs, LABELS)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(gold, probs, multi_class="ovr", labels=LABELS,
                                                             average="macro"), abs=1e-4)
    predicted = [LABELS[int(np.argmax(p))] for p in probs]
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-4)


def test_roc_auc_skips_a_class_without_examples():
    metrics = classification_metrics(["bill", "permit"], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]], LABELS)
    assert metrics["per_class"]["trash"]["roc_auc"] is None and metrics["roc_auc"] == 1.0


def test_softmax():
    assert softmax([0.0, math.log(3)]) == pytest.approx([0.25, 0.75])


def set_config(tmp_path, rows, labels=("yes", "no")):
    path = tmp_path / "set.jsonl"
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return validate_config({"eval": {"classification": [{"name": "s", "file": str(path), "labels": list(labels)}]}})


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": "maybe"}],
     r"set.jsonl:1: label 'maybe' is not in eval.classification.0.labels \(yes, no\)"),
    ([{"text": "a", "label": "yes"}, {"question": "b", "answer": "no"}], r"set.jsonl:2: expected \{\"text\""),
    ([{"text": " ", "label": "yes"}], r"set.jsonl:1: \"text\" must be a non-empty string"),
    (["{not json"], r"set.jsonl:1"),
])
def test_bad_set_files_name_the_line(tmp_path, rows, message):
    config = set_config(tmp_path, rows)
    with pytest.raises(TailorError, match=message):
        load_sets(config.eval.classification, tmp_path)


def test_label_set_must_be_distinct(tmp_path):
    with pytest.raises(TailorError, match="labels must be distinct"):
        set_config(tmp_path, [], labels=("yes", "yes"))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tailor.evaluate.sources import LocalModel
    from tailor.models.base import load_model, load_tokenizer

    return LocalModel("tiny", load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir), torch.float32)


def test_label_likelihood_matches_a_plain_forward_pass(tiny):
    from tailor.train.examples import tokenize_chat

    conversation = [{"role": "user", "content": "Is the library open on Sunday?"}]
    scores = tiny.option_logprobs([conversation, conversation], ["yes", "no, closed"], batch_size=3)
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)  # batching and padding change nothing
    for option, score in zip(["yes", "no, closed"], scores[0], strict=True):
        example = tokenize_chat(tiny.tokenizer, [*conversation, {"role": "assistant", "content": option}],
                                last_turn_only=True)
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        expected = sum(float(logprobs[t - 1, example.input_ids[t]]) for t, label in enumerate(example.labels)
                       if label != -100)
        assert score == pytest.approx(expected, abs=1e-3)


def test_scoring_a_set_on_the_tiny_model(tiny, tmp_path):
    rows = [{"text": f"My bin was not emptied on day {i}.", "label": ["trash", "bill", "permit"][i % 3]}
            for i in range(6)]
    config = set_config(tmp_path, rows, labels=LABELS)
    (dataset,) = load_sets(config.eval.classification, tmp_path)
    metrics, predictions = score_set(tiny, dataset, system_prompt="", batch_size=4)
    assert len(predictions) == 6 and metrics["n"] == 6
    for row in predictions:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        assert row["predicted"] == max(row["probabilities"], key=row["probabilities"].get)
    correct = sum(row["predicted"] == row["label"] for row in predictions)
    assert metrics["accuracy"] == pytest.approx(correct / 6, abs=1e-4)
    assert sum(map(sum, metrics["confusion_matrix"])) == 6
