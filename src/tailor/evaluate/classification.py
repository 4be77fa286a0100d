"""Classification sets (`eval.classification`): `{text, label}` JSONL files with a fixed label set.

The model is never asked to write a label that is then parsed: each label is scored by the model's likelihood of
answering with exactly that label, and the probabilities over the label set (a softmax of those log-likelihoods)
give both the choice (the most likely label) and the ROC curves. Metrics come from scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tailor.config import ClassificationSetConfig
from tailor.errors import TailorError
from tailor.workspace import read_jsonl


@dataclass
class ClassificationSet:
    name: str
    path: Path
    labels: list[str]
    instruction: str
    records: list[tuple[str, str, str]]  # (source "file:line", text, gold label)

    def conversation(self, text: str, system_prompt: str) -> list[dict]:
        question = self.instruction.replace("{labels}", ", ".join(self.labels)) + "\n\n" + text
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return [*system, {"role": "user", "content": question}]


def load_sets(sets: list[ClassificationSetConfig], root: Path, limit: int = 0) -> list[ClassificationSet]:
    """Read and check every set before any model loads: shape, empty texts, labels outside the label set."""
    loaded = []
    for index, spec in enumerate(sets):
        key = f"eval.classification.{index}"
        path = Path(spec.file) if Path(spec.file).is_absolute() else Path(root) / spec.file
        if not path.is_file():
            raise TailorError(f"{key}.file: {path} does not exist")
        records = []
        for line_no, record in read_jsonl(path):
            where = f"{path}:{line_no}"
            if not isinstance(record, dict) or not {"text", "label"} <= set(record):
                raise TailorError(f"{where}: expected {{\"text\": ..., \"label\": ...}} (set '{spec.name}')")
            text, label = record["text"], record["label"]
            if not isinstance(text, str) or not text.strip():
                raise TailorError(f"{where}: \"text\" must be a non-empty string")
            if not isinstance(label, str) or label not in spec.labels:
                raise TailorError(f"{where}: label {label!r} is not in {key}.labels ({', '.join(spec.labels)})")
            records.append((where, text, label))
        if not records:
            raise TailorError(f"{path}: no records (set '{spec.name}')")
        loaded.append(ClassificationSet(spec.name, path, list(spec.labels), spec.instruction,
                                        records[:limit] if limit else records))
    names = [s.name for s in loaded]
    if len(set(names)) != len(names):
        raise TailorError("eval.classification: set names must be unique")
    return loaded


def softmax(logprobs: list[float]) -> list[float]:
    top = max(logprobs)
    weights = [math.exp(value - top) for value in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def classification_metrics(gold: list[str], probabilities: list[list[float]], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, one-vs-rest ROC-AUC (and its curves), confusion matrix.

    `probabilities[i][j]`: the model's probability of labels[j] for example i; the prediction is the argmax.
    ROC-AUC of a class is left out (null) when the gold labels hold no example of it, or only it: a curve needs
    both positives and negatives. The macro ROC-AUC averages the classes that have one.
    """
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
        roc_curve,
    )

    scores = np.asarray(probabilities, dtype=float)  # [examples, labels]
    predicted = [labels[int(i)] for i in scores.argmax(axis=1)]
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=labels,
                                                                     zero_division=0)
    per_class, curves, aucs = {}, {}, []
    for j, label in enumerate(labels):
        positives = np.asarray([g == label for g in gold])
        auc = None
        if 0 < positives.sum() < len(gold):
            auc = float(roc_auc_score(positives, scores[:, j]))
            fpr, tpr, _ = roc_curve(positives, scores[:, j])
            curves[label] = {"fpr": [round(float(x), 4) for x in fpr], "tpr": [round(float(x), 4) for x in tpr]}
            aucs.append(auc)
        per_class[label] = {"precision": round(float(precision[j]), 4), "recall": round(float(recall[j]), 4),
                            "f1": round(float(f1[j]), 4), "support": int(support[j]),
                            "roc_auc": None if auc is None else round(auc, 4)}
    return {
        "accuracy": round(float(accuracy_score(gold, predicted)), 4),
        "macro_f1": round(float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)), 4),
        "roc_auc": round(sum(aucs) / len(aucs), 4) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(gold, predicted, labels=labels).tolist(),  # rows: gold, cols: predicted
        "roc_curves": curves,
        "labels": labels,
        "n": len(gold),
    }


def score_set(model, dataset: ClassificationSet, *, system_prompt: str, batch_size: int
              ) -> tuple[dict, list[dict]]:
    """The set's metrics for one model, and one prediction row per record."""
    conversations = [dataset.conversation(text, system_prompt) for _, text, _ in dataset.records]
    logprobs = model.option_logprobs(conversations, dataset.labels, batch_size=batch_size)
    probabilities = [softmax(row) for row in logprobs]
    gold = [label for _, _, label in dataset.records]
    metrics = classification_metrics(gold, probabilities, dataset.labels)
    rows = []
    for (source, text, label), probs in zip(dataset.records, probabilities, strict=True):
        best = max(range(len(probs)), key=probs.__getitem__)
        rows.append({"model": model.name, "set": dataset.name, "source": source, "text": text, "label": label,
                     "predicted": dataset.labels[best],
                     "probabilities": {lab: round(p, 4) for lab, p in zip(dataset.labels, probs, strict=True)}})
    return metrics, rows
