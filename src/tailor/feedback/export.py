"""Feedback records (the server's SQLite `feedback` table, or the same fields as JSONL) → preference pairs and
per-model statistics.

A thumbs-down with a correction is a pair by itself (the correction chosen, the answer rejected); a thumbs-up and a
thumbs-down answer to the same conversation make another (the liked answer chosen).
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import read_jsonl

COLUMNS = ("id", "response_id", "model", "prompt", "answer", "rating", "correction", "comment", "user",
           "created_at")


def check_record(record: dict, where: str) -> dict:
    """One feedback record (a table row or a JSONL line) checked and normalized; `where` names it in errors."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        try:
            prompt = json.loads(prompt)  # the table stores the messages as JSON text
        except json.JSONDecodeError:
            prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        raise TailorError(f"{where}: \"prompt\" must be a list of chat messages with role and content")
    if record.get("rating") not in ("up", "down"):
        raise TailorError(f"{where}: \"rating\" must be \"up\" or \"down\" (found {record.get('rating')!r})")
    if not isinstance(record.get("answer"), str):
        raise TailorError(f"{where}: \"answer\" must be a text")
    correction = record.get("correction")
    if correction is not None and not isinstance(correction, str):
        raise TailorError(f"{where}: \"correction\" must be a text or null")
    return {**{key: record.get(key) for key in COLUMNS}, "prompt": prompt,
            "model": record.get("model") or "unknown", "correction": (correction or "").strip() or None}


def load_feedback(path: Path | str) -> list[dict]:
    """Feedback from a SQLite file (table `feedback`) or a JSONL file with the same fields."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    if path.suffix.lower() in (".jsonl", ".json"):
        return [check_record(record, f"{path}:{line_no}") for line_no, record in read_jsonl(path)]
    try:
        # read-only: exporting must never change (or lock for writing) the server's live database
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            rows = [dict(row) for row in db.execute("SELECT * FROM feedback ORDER BY id")]
    except sqlite3.DatabaseError as exc:
        raise TailorError(f"{path}: not a feedback database ({exc}); expected a SQLite file with a `feedback` "
                          f"table, or a .jsonl file") from None
    return [check_record(row, f"{path}: feedback row {row.get('id')}") for row in rows]


def to_pairs(records: list[dict]) -> list[dict]:
    """Preference pairs `{prompt, chosen, rejected}`, each pair once, in the order the feedback arrived."""
    pairs, seen = [], set()

    def add(prompt, chosen, rejected, source):
        key = (json.dumps(prompt, sort_keys=True), chosen.strip(), rejected.strip())
        if chosen.strip() and rejected.strip() and chosen.strip() != rejected.strip() and key not in seen:
            seen.add(key)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source})

    liked, disliked = defaultdict(list), defaultdict(list)
    for record in records:
        conversation = json.dumps(record["prompt"], sort_keys=True)
        if record["rating"] == "down":
            disliked[conversation].append(record)
            if record["correction"]:
                add(record["prompt"], record["correction"], record["answer"], "correction")
        else:
            liked[conversation].append(record)
    for conversation, ups in liked.items():
        for up in ups:
            for down in disliked.get(conversation, []):
                add(up["prompt"], up["answer"], down["answer"], "up_vs_down")
    return pairs


def to_unpaired(records: list[dict]) -> list[dict]:
    """Unpaired examples `{prompt, completion, label, feedback_id}` for KTO: each rated answer as it was (thumbs
    up: desirable, down: undesirable) and each correction as a desirable answer of its own."""
    examples = []
    for record in records:
        if record["answer"].strip():
            examples.append({"prompt": record["prompt"], "completion": record["answer"],
                             "label": record["rating"] == "up", "feedback_id": record["id"]})
        if record["correction"]:
            examples.append({"prompt": record["prompt"], "completion": record["correction"], "label": True,
                             "feedback_id": record["id"]})
    return examples


@dataclass
class ModelStats:
    count: int = 0
    up: int = 0
    corrections: int = 0
    users: set = field(default_factory=set)

    def to_dict(self) -> dict:
        return {"count": self.count, "up": self.up, "down": self.count - self.up,
                "up_rate": round(self.up / self.count, 4) if self.count else None,
                "corrections": self.corrections, "users": len(self.users)}


def stats(records: list[dict]) -> dict[str, dict]:
    """Per model version: feedback count, thumbs up and down, up rate, corrections, distinct users."""
    by_model: dict[str, ModelStats] = defaultdict(ModelStats)
    for record in records:
        entry = by_model[record["model"]]
        entry.count += 1
        entry.up += record["rating"] == "up"
        entry.corrections += record["correction"] is not None
        if record.get("user"):
            entry.users.add(record["user"])
    return {model: entry.to_dict() for model, entry in sorted(by_model.items())}
