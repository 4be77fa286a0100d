"""Every completion the server gives, and the feedback users send about it, in one SQLite file.

Two tables; `feedback` is the contract other stages read (e.g. to turn corrections into training data):

    completions(id, model, alias, endpoint, prompt, answer, user, created_at, latency_ms, first_token_ms,
                completion_tokens)
    feedback(id, response_id, model, prompt, answer, rating, correction, comment, user, created_at,
             review, reviewed_correction, reviewed_by, reviewed_at, review_note)

`prompt` is a JSON list of chat messages (a legacy completion's prompt is one user message); `rating` is "up" or
"down"; times are ISO 8601 UTC. A write is committed before the call returns, with the write-ahead log synced
(`synchronous=FULL`), so feedback the server acknowledged survives the process being killed the next instant.

A correction waits in the review queue (`review` NULL) until staff accept it (optionally edited: the text that
trains is `reviewed_correction`) or reject it; `tailor improve` trains on accepted ones. The review columns were
added later: opening an older database adds them (`migrate`).

`read_feedback_counts` and `read_answers` read a database a running server writes, read-only (`tailor monitor`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import now_iso

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, alias TEXT, endpoint TEXT NOT NULL, prompt TEXT NOT NULL,
    answer TEXT NOT NULL, user TEXT, created_at TEXT NOT NULL, latency_ms REAL, first_token_ms REAL,
    completion_tokens INTEGER);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL REFERENCES completions(id),
    model TEXT NOT NULL, prompt TEXT NOT NULL, answer TEXT NOT NULL,
    rating TEXT NOT NULL CHECK (rating IN ('up', 'down')), correction TEXT, comment TEXT, user TEXT,
    created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback(response_id);
CREATE INDEX IF NOT EXISTS completions_alias ON completions(alias);
"""
# the review queue's columns, added to databases written before it existed
REVIEW_COLUMNS = {"review": "TEXT CHECK (review IN ('accepted', 'rejected'))", "reviewed_correction": "TEXT",
                  "reviewed_by": "TEXT", "reviewed_at": "TEXT", "review_note": "TEXT"}
REVIEWS = ("accepted", "rejected")


def migrate(db: sqlite3.Connection) -> None:
    """Add the columns a database from an older version lacks (ALTER TABLE ... ADD COLUMN keeps every row)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
    for column, kind in REVIEW_COLUMNS.items():
        if column not in present:
            db.execute(f"ALTER TABLE feedback ADD COLUMN {column} {kind}")


class UnknownResponseError(TailorError):
    """Feedback named a completion id this server never gave."""


class FeedbackStore:
    def __init__(self, path: Path | str = ":memory:"):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # one connection shared by the worker threads, guarded by a lock: SQLite writes one at a time anyway
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            migrate(self._db)
        except sqlite3.DatabaseError as exc:
            raise TailorError(f"serve.feedback_db: {self.path} is not a usable SQLite database ({exc})") from None
        self._lock = threading.Lock()

    def record_completion(self, *, id: str, model: str, alias: str | None, endpoint: str, prompt: list[dict],
                          answer: str, user: str | None, latency_ms: float | None, first_token_ms: float | None,
                          completion_tokens: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (id, model, alias, endpoint, json.dumps(prompt, ensure_ascii=False), answer, user, now_iso(),
                 latency_ms, first_token_ms, completion_tokens))

    def add_feedback(self, *, response_id: str, rating: str, correction: str | None = None,
                     comment: str | None = None, user: str | None = None) -> tuple[int, str]:
        """Store one piece of feedback; returns its id and the model that gave the answer."""
        with self._lock:
            row = self._db.execute("SELECT model, prompt, answer, user FROM completions WHERE id = ?",
                                   (response_id,)).fetchone()
            if row is None:
                raise UnknownResponseError(f"response_id: no completion '{response_id}' was given by this server")
            model, prompt, answer, asked_by = row
            cursor = self._db.execute(
                "INSERT INTO feedback (response_id, model, prompt, answer, rating, correction, comment, user, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (response_id, model, prompt, answer, rating, correction, comment, user or asked_by, now_iso()))
            feedback_id = cursor.lastrowid
            if feedback_id is None:  # sqlite3 sets it after every INSERT into a rowid table such as this one
                raise AssertionError("feedback: the database gave the new row no id")
            return feedback_id, model

    def review(self, feedback_id: int, decision: str, *, by: str, correction: str | None = None,
               note: str | None = None) -> dict:
        """Accept (optionally with an edited correction) or reject the correction of one feedback row."""
        if decision not in REVIEWS:
            raise TailorError(f"review: must be accepted or rejected (found {decision!r})")
        with self._lock:
            row = self._db.execute("SELECT correction FROM feedback WHERE id = ?", (feedback_id,)).fetchone()
            if row is None:
                raise TailorError(f"feedback {feedback_id}: no such row in {self.path}")
            text = (correction if correction is not None else row[0] or "").strip()
            if decision == "accepted" and not text:
                raise TailorError(f"feedback {feedback_id}: the correction is empty; edit it or reject it")
            self._db.execute("UPDATE feedback SET review = ?, reviewed_correction = ?, reviewed_by = ?, "
                             "reviewed_at = ?, review_note = ? WHERE id = ?",
                             (decision, text if decision == "accepted" else None, by, now_iso(), note, feedback_id))
        return {"id": feedback_id, "review": decision, "correction": text if decision == "accepted" else None}

    def rows(self, where: str = "1", params: tuple = ()) -> list[dict]:
        """Feedback rows with the alias their completion was asked under, oldest first."""
        with self._lock:
            cursor = self._db.execute(
                f"SELECT f.*, c.alias AS alias FROM feedback f LEFT JOIN completions c ON c.id = f.response_id "
                f"WHERE {where} ORDER BY f.id", params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _read_only(path: Path | str) -> sqlite3.Connection:
    """A read-only connection to the database a running server writes (WAL: readers never block the writer)."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: no feedback database (serve.feedback_db, e.g. RUN/feedback.db)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("SELECT 1 FROM feedback LIMIT 1")
    except sqlite3.DatabaseError as exc:
        raise TailorError(f"{path}: not a tailor feedback database ({exc})") from None
    return db


def _iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds")


def read_feedback_counts(path: Path | str, since: float | None = None) -> dict[tuple[str, str], int]:
    """Thumbs per (model, rating) given at or after `since` (Unix time; all of them when None)."""
    db = _read_only(path)
    try:
        rows = db.execute("SELECT model, rating, COUNT(*) FROM feedback WHERE created_at >= ? GROUP BY model, rating",
                          (_iso(since) if since is not None else "",)).fetchall()
    finally:
        db.close()
    return {(model, rating): count for model, rating, count in rows}


def read_answers(path: Path | str, since: float | None = None) -> list[dict]:
    """Every completion since `since` with its question (the last user message), answer, model, time and whether
    any feedback on it was a thumbs down: what a drift report reads."""
    db = _read_only(path)
    try:
        rows = db.execute(
            "SELECT c.id, c.model, c.prompt, c.answer, c.created_at, EXISTS (SELECT 1 FROM feedback f WHERE "
            "f.response_id = c.id AND f.rating = 'down') FROM completions c WHERE c.created_at >= ? "
            "ORDER BY c.created_at", (_iso(since) if since is not None else "",)).fetchall()
    finally:
        db.close()
    answers = []
    for id, model, prompt, answer, created_at, down in rows:
        question = next((m.get("content", "") for m in reversed(json.loads(prompt)) if m.get("role") == "user"), "")
        answers.append({"id": id, "model": model, "question": question, "answer": answer,
                        "created_at": created_at, "thumbs_down": bool(down)})
    return answers
