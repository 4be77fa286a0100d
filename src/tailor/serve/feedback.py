"""Every completion the server gives, and the feedback users send about it, in one SQLite file.

Two tables; `feedback` is the contract other stages read (e.g. to turn corrections into training data):

    completions(id, model, alias, endpoint, prompt, answer, user, created_at, latency_ms, first_token_ms,
                completion_tokens)
    feedback(id, response_id, model, prompt, answer, rating, correction, comment, user, created_at)

`prompt` is a JSON list of chat messages (a legacy completion's prompt is one user message); `rating` is "up" or
"down"; times are ISO 8601 UTC. A write is committed before the call returns, with the write-ahead log synced
(`synchronous=FULL`), so feedback the server acknowledged survives the process being killed the next instant.

`read_feedback_counts` and `read_answers` read a database a running server writes, read-only (`tailor monitor`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
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
    rating TEXT NOT NULL CHECK (rating IN ('up', 'down')), correction TEXT, comment TEXT, user TEXT, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_response ON feedback(response_id);
CREATE INDEX IF NOT EXISTS completions_alias ON completions(alias);
"""


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
            return cursor.lastrowid, model

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
    return datetime.fromtimestamp(unix_time, timezone.utc).isoformat(timespec="seconds")


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
