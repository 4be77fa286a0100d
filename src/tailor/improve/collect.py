"""Collect: what the served model's users said since the production version was trained, read from the server's
feedback database (a live SQLite file in WAL mode: reading never blocks the server).

A feedback row names the model that answered: the registry name (`city`, answered by whichever version was in
production then), a version's label (`city@4`, a canary), or another model the server also serves (left out). A
label of a version the registry does not have is reported and left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tailor.config import TailorConfig
from tailor.data.pii import PiiRedactor
from tailor.errors import TailorError
from tailor.registry.store import Registry
from tailor.registry.tables import ModelVersion
from tailor.serve.feedback import FeedbackStore, read_answers
from tailor.workspace import read_jsonl


@dataclass
class Collected:
    corrections: list[dict] = field(default_factory=list)  # {feedback_id, prompt, correction, answer, redacted}
    rated: list[dict] = field(default_factory=list)  # {feedback_id, prompt, answer, rating, correction}
    regression: list[dict] = field(default_factory=list)  # {feedback_id, prompt, answer}
    unanswered: list[dict] = field(default_factory=list)  # {id, model, question, answer}
    problems: list[str] = field(default_factory=list)  # one line per row left out, naming its id
    pending_review: int = 0
    other_models: dict[str, int] = field(default_factory=dict)
    last_feedback_at: str | None = None

    def to_dict(self) -> dict:
        return {"corrections": self.corrections, "rated": self.rated, "regression": self.regression,
                "unanswered": self.unanswered, "problems": self.problems, "pending_review": self.pending_review,
                "other_models": self.other_models, "last_feedback_at": self.last_feedback_at}


def feedback_path(config: TailorConfig, root: Path, production: ModelVersion) -> Path:
    """improve.feedback_db, else serve.feedback_db in the production run's folder, else in the workspace."""
    if config.improve.feedback_db:
        return (root / config.improve.feedback_db).resolve()
    for folder in (Path(production.run_dir), root):
        if (folder / config.serve.feedback_db).is_file():
            return (folder / config.serve.feedback_db).resolve()
    looked = f"{Path(production.run_dir) / config.serve.feedback_db} or {root / config.serve.feedback_db}"
    raise TailorError(f"improve.feedback_db: no feedback database at {looked}; name the server's serve.feedback_db "
                      f"file")


def public_text(production: ModelVersion) -> str:
    """What the production version was trained on and the documents: contact data found there is public (the
    city's phone numbers), so a correction quoting it keeps it while a resident's own number is redacted."""
    run_dir = Path(production.run_dir)
    pieces = []
    for name in ("data/train.jsonl", "corpus.jsonl"):
        if (run_dir / name).is_file():
            pieces += [json.dumps(record, ensure_ascii=False) for _, record in read_jsonl(run_dir / name)]
    return "\n".join(pieces)


def utc(moment: datetime) -> datetime:
    """SQLite gives back the registry's times without their zone; they were written in UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def question_of(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def collect(config: TailorConfig, registry: Registry, name: str, production: ModelVersion, db_path: Path) -> Collected:
    if not db_path.is_file():
        raise TailorError(f"improve.feedback_db: {db_path} not found")
    versions = {v.label: v for v in registry.versions(name)}
    consumed = registry.used_feedback(name)
    store = FeedbackStore(db_path)  # adds the review columns to an older database
    try:
        rows = store.rows()
    finally:
        store.close()
    found = Collected()
    redactor = PiiRedactor("redact", keep=config.ingest.pii_keep)
    public = public_text(production)
    since = utc(production.created_at).isoformat(timespec="seconds")
    newest_up: dict[str, dict] = {}
    corrected_questions = set()
    for row in rows:
        model = row["model"]
        if model != name and not model.startswith(f"{name}@"):
            found.other_models[model] = found.other_models.get(model, 0) + 1
            continue
        if model != name and model not in versions:
            known = ", ".join(sorted(versions, key=lambda label: versions[label].version))
            found.problems.append(f"feedback {row['id']}: answered by {model}, a version the registry does not have "
                                  f"(versions of {name}: {known}); left out")
            continue
        try:
            prompt = json.loads(row["prompt"])
        except json.JSONDecodeError:
            found.problems.append(f"feedback {row['id']}: its prompt is not JSON; left out")
            continue
        if row["id"] in consumed:
            continue
        new = row["created_at"] >= since
        if new:
            found.last_feedback_at = max(found.last_feedback_at or "", row["created_at"])
        correction = row["correction"]
        review = row.get("review")
        if correction is not None or review is not None:
            text = (row.get("reviewed_correction") if review == "accepted" else correction) or ""
            if review == "rejected":
                pass
            elif not text.strip():
                found.problems.append(f"feedback {row['id']}: the correction is empty; left out (edit it in the "
                                      f"review queue or reject it)")
            elif review is None and config.improve.corrections == "reviewed":
                found.pending_review += 1
            else:
                cleaned, replaced = redactor.apply(text.strip(), public)
                found.corrections.append({"feedback_id": row["id"], "prompt": prompt, "correction": cleaned,
                                          "answer": row["answer"], "model": model,
                                          "redacted": sorted({f.type for f in replaced})})
                corrected_questions.add(question_of(prompt).strip().lower())
        if new:
            found.rated.append({"feedback_id": row["id"], "prompt": prompt, "answer": row["answer"],
                                "rating": row["rating"], "correction": None})
        if row["rating"] == "up" and row["answer"].strip():
            newest_up[question_of(prompt).strip().lower()] = {"feedback_id": row["id"], "prompt": prompt,
                                                              "answer": row["answer"]}
    # the regression set: what users liked, newest first, never a question somebody corrected
    liked = [entry for question, entry in newest_up.items() if question not in corrected_questions]
    found.regression = sorted(liked, key=lambda e: -e["feedback_id"])[:config.improve.regression_size]
    abstain = config.retrieval.abstain_answer.strip().lower()
    for answer in read_answers(db_path, utc(production.created_at).timestamp()):
        if answer["model"] == name or answer["model"].startswith(f"{name}@"):
            if answer["thumbs_down"] or (abstain and abstain in answer["answer"].lower()):
                found.unanswered.append({key: answer[key] for key in ("id", "model", "question", "answer")})
    return found
