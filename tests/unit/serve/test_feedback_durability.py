"""0 acknowledged feedback rows lost: a real `tailor serve` subprocess (tiny model) takes feedback from 8 concurrent
clients and is killed with SIGKILL mid-load; every feedback POST that got a 2xx must be in the SQLite file, with its
rating and correction. The store's settings are checked as well, not assumed: the file is in WAL mode and the
server's connection syncs every commit (synchronous=FULL)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading

import httpx
import yaml

from tailor.serve.feedback import FeedbackStore
from tests.unit.helpers import wait_until_healthy

CLIENTS = 8
KILL_AFTER = 60  # acknowledged feedback rows before the kill; the clients keep posting until the server is gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_store_runs_in_wal_mode_with_full_sync(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is fsynced at every commit
    store.close()
    assert (tmp_path / "feedback.db").read_bytes()[18:20] == b"\x02\x02"  # WAL in the file header, for every reader


def test_no_acknowledged_feedback_is_lost_when_the_server_is_killed(tiny_model_dir, tmp_path):
    db_path = tmp_path / "feedback.db"
    (tmp_path / "tailor.yaml").write_text(yaml.safe_dump({
        "base_model": tiny_model_dir, "train": {"dtype": "fp32"},
        "serve": {"feedback_db": str(db_path), "request_log": None, "cache_size": 0, "max_new_tokens": 2}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tailor.cli.app", "serve", "-w", str(tmp_path), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    acknowledged: list[tuple[int, str, str, str | None]] = []  # (id, response id, rating, correction)
    lock = threading.Lock()
    enough = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = 0
            while True:
                try:
                    reply = http.post("/v1/chat/completions", json={
                        "model": "base", "max_tokens": 2, "user": f"client-{number}",
                        "messages": [{"role": "user", "content": f"Question {number}-{i}?"}]})
                    response_id = reply.json()["id"]
                    rating = "down" if i % 2 else "up"
                    correction = f"Answer {number}-{i}." if rating == "down" else None
                    ack = http.post("/v1/feedback", json={"response_id": response_id, "rating": rating,
                                                          "correction": correction})
                except (httpx.HTTPError, ValueError, KeyError):
                    return  # the server is gone (or going): what it acknowledged before is what counts
                if 200 <= ack.status_code < 300:
                    with lock:
                        acknowledged.append((ack.json()["id"], response_id, rating, correction))
                        if len(acknowledged) >= KILL_AFTER:
                            enough.set()
                i += 1

    try:
        wait_until_healthy(url, server)
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        assert enough.wait(180), f"only {len(acknowledged)} feedback rows acknowledged"
        server.send_signal(signal.SIGKILL)  # mid-load: requests in flight, no shutdown, no checkpoint
        server.wait(timeout=10)
        for thread in threads:
            thread.join(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    with lock:
        acked = list(acknowledged)
    assert len(acked) >= KILL_AFTER
    with sqlite3.connect(db_path) as db:  # opening replays the WAL, as the next server start would
        stored = {row[0]: row[1:] for row in db.execute("SELECT id, response_id, rating, correction FROM feedback")}
    lost = [row for row in acked if stored.get(row[0]) != row[1:]]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged feedback rows are missing or changed: {lost[:3]}"
    print(f"{len(acked)} acknowledged feedback rows, all stored ({len(stored)} rows in the file)")
