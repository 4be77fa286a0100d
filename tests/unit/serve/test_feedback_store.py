"""The feedback database: completions and feedback in SQLite, committed before the server answers, so a server
killed right after acknowledging feedback loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import httpx
import pytest

from tailor.errors import TailorError
from tailor.serve.feedback import FeedbackStore, UnknownResponseError
from tests.unit.helpers import wait_until_healthy

SERVER = """
import sys, torch, uvicorn
from tailor.config import ServeConfig
from tailor.serve.app import bind_socket, create_app
from tailor.serve.engine import Engine
engine = Engine(sys.argv[1], dtype=torch.float32, max_new_tokens=4)
sock = bind_socket("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
app = create_app(engine, ServeConfig(feedback_db=sys.argv[2], request_log=None))
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


def test_feedback_references_a_recorded_completion(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    prompt = [{"role": "user", "content": "Library hours?"}]
    store.record_completion(id="chatcmpl-1", model="lora", alias="city-bot", endpoint="chat", prompt=prompt,
                            answer="9 to 5.", user="ann", latency_ms=12.5, first_token_ms=3.0, completion_tokens=4)
    feedback_id, model = store.add_feedback(response_id="chatcmpl-1", rating="down", correction="9 to 6.")
    assert model == "lora" and feedback_id == 1
    with pytest.raises(UnknownResponseError, match="response_id: no completion 'chatcmpl-2'"):
        store.add_feedback(response_id="chatcmpl-2", rating="up")
    store.close()
    with sqlite3.connect(tmp_path / "feedback.db") as db:
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM feedback").fetchone())
    assert set(row) == {"id", "response_id", "model", "prompt", "answer", "rating", "correction", "comment", "user",
                        "created_at", "review", "reviewed_correction", "reviewed_by", "reviewed_at", "review_note"}
    assert json.loads(row["prompt"]) == prompt and row["answer"] == "9 to 5." and row["user"] == "ann"
    assert (row["rating"], row["correction"], row["comment"]) == ("down", "9 to 6.", None)


def test_acknowledged_feedback_survives_killing_the_server(tiny_model_dir, tmp_path):
    db_path = tmp_path / "feedback.db"
    server = subprocess.Popen([sys.executable, "-c", SERVER, tiny_model_dir, str(db_path)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, timeout=60)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()
        ack = httpx.post(f"{url}/v1/feedback", timeout=30, json={"response_id": reply["id"], "rating": "down",
                                                                 "correction": "Hello!"})
        assert ack.status_code == 200
        server.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed remains
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT response_id, rating, correction FROM feedback").fetchall()
    assert rows == [(reply["id"], "down", "Hello!")]


def test_a_database_from_before_the_review_queue_is_migrated(tmp_path):
    """An existing feedback.db keeps its rows and gains the review columns when a server (or improve) opens it."""
    path = tmp_path / "feedback.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE completions (id TEXT PRIMARY KEY, model TEXT NOT NULL, alias TEXT, endpoint TEXT NOT NULL,
                prompt TEXT NOT NULL, answer TEXT NOT NULL, user TEXT, created_at TEXT NOT NULL, latency_ms REAL,
                first_token_ms REAL, completion_tokens INTEGER);
            CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL, model TEXT NOT NULL,
                prompt TEXT NOT NULL, answer TEXT NOT NULL, rating TEXT NOT NULL, correction TEXT, comment TEXT,
                user TEXT, created_at TEXT NOT NULL);
            INSERT INTO completions VALUES ('c1', 'city', NULL, 'chat', '[]', 'Noon.', NULL, '2025-01-01', 1, 1, 1);
            INSERT INTO feedback (response_id, model, prompt, answer, rating, correction, created_at)
                VALUES ('c1', 'city', '[]', 'Noon.', 'down', 'At 9 am.', '2025-01-01');""")
    store = FeedbackStore(path)
    assert store.review(1, "accepted", by="ann", correction="At 9 am sharp.")["correction"] == "At 9 am sharp."
    with pytest.raises(TailorError, match="feedback 1: the correction is empty"):
        store.review(1, "accepted", by="ann", correction="  ")
    (row,) = store.rows()
    store.close()
    assert (row["correction"], row["review"], row["reviewed_correction"], row["reviewed_by"]) == (
        "At 9 am.", "accepted", "At 9 am sharp.", "ann")
