"""Classification data `{text, label}` → stratified, deterministic train/eval/test splits and the label set.

Stratified: each label is split on its own, so a rare label still appears in the held-out sets in its share (a
plain random split of 30 examples can leave a 3-example label out of eval altogether). Deterministic: inside a
label, examples are ordered by a hash of their text and the seed, so rerunning gives the same split.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tailor.data.dedup import find_leaks
from tailor.data.qa import split_position
from tailor.errors import TailorError

TEXT_KEYS = ("text", "input", "sentence", "content")


@dataclass
class ClassificationSplits:
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        per_label = {label: {name: sum(r["label"] == label for r in getattr(self, name))
                             for name in ("train", "eval", "test")} for label in self.labels}
        return {"train": len(self.train), "eval": len(self.eval), "test": len(self.test), "labels": per_label,
                "duplicates": self.duplicates, "leaked": self.leaked}


def read_classification_file(path: Path | str, labels: set[str] | None = None) -> list[dict]:
    """Records {text, label, source} of one CSV/TSV/JSONL file; a problem raises naming `file:line`."""
    from tailor.data.formats import _records

    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    records = []
    for line, record in _records(path):
        where = f"{path}:{line}"
        text_key = next((key for key in TEXT_KEYS if key in record), None)
        if text_key is None or not isinstance(record[text_key], str) or not record[text_key].strip():
            raise TailorError(f'{where}: no text (expected a non-empty "text" field)')
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise TailorError(f'{where}: no label (expected a non-empty "label" field)')
        label = str(label).strip()
        if labels is not None and label not in labels:
            raise TailorError(f"{where}: label {label!r} is not in data.labels ({', '.join(sorted(labels))}); fix "
                              f"the label or add it there")
        records.append({"text": record[text_key].strip(), "label": label, "source": where})
    if not records:
        raise TailorError(f"{path}: no records")
    return records


def split_classification(records: list[dict], *, eval_fraction: float, test_fraction: float, seed: int,
                         labels: list[str] | None = None, leak_threshold: float | None = 0.8
                         ) -> ClassificationSplits:
    splits = ClassificationSplits()
    by_label: dict[str, list[dict]] = defaultdict(list)
    seen: dict[str, dict] = {}
    for record in records:
        key = " ".join(record["text"].lower().split())
        first = seen.get(key)
        if first is not None:
            why = "duplicate of" if first["label"] == record["label"] else \
                f"conflicts with (labelled {first['label']!r} there, {record['label']!r} here)"
            splits.duplicates.append(f"{record['source']}: {why} {first['source']}; dropped")
            continue
        seen[key] = record
        by_label[record["label"]].append(record)
    splits.labels = list(labels) if labels else sorted(by_label)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda r: split_position(r["text"], seed))
        n_eval, n_test = round(len(group) * eval_fraction), round(len(group) * test_fraction)
        # a label seen at all is trained on: the held-out shares give way first
        while n_eval + n_test >= len(group) and n_eval + n_test > 0:
            n_test, n_eval = (n_test - 1, n_eval) if n_test >= n_eval else (n_test, n_eval - 1)
        splits.eval += group[:n_eval]
        splits.test += group[n_eval:n_eval + n_test]
        splits.train += group[n_eval + n_test:]
    if leak_threshold:
        held_out = {r["source"]: r for r in splits.eval + splits.test}
        leaks = find_leaks([(r["source"], r["text"]) for r in splits.train],
                           [(source, r["text"]) for source, r in held_out.items()], leak_threshold)
        leaked = set()
        for source, train_source, similarity in leaks:
            splits.leaked.append(f"{source}: {similarity:.0%} similar to training record {train_source}; dropped "
                                 f"from the held-out set")
            leaked.add(source)
        splits.eval = [r for r in splits.eval if r["source"] not in leaked]
        splits.test = [r for r in splits.test if r["source"] not in leaked]
    order = {id(record): index for index, record in enumerate(records)}
    for name in ("train", "eval", "test"):  # file order, not hash order, for a reader of the files
        getattr(splits, name).sort(key=lambda r: order[id(r)])
    return splits
