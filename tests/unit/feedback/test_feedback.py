"""Feedback → preference pairs and statistics, from the server's SQLite table and from JSONL; the CLI commands."""

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.data.preference import load_preference_file
from tailor.errors import TailorError
from tailor.feedback.export import load_feedback, stats, to_pairs

HOURS = [{"role": "user", "content": "When is the library open?"}]
PERMIT = [{"role": "user", "content": "How much is a parking permit?"}]
ROWS = [  # (model, prompt, answer, rating, correction, user)
    ("city@1", HOURS, "It is open.", "down", "Monday to Friday, 9 am to 7 pm.", "ann"),
    ("city@1", HOURS, "9 to 7 on weekdays.", "up", None, "bob"),
    ("city@2", PERMIT, "$45 per year.", "up", None, "ann"),
    ("city@2", PERMIT, "Free!", "down", "", "cat"),
    ("city@2", PERMIT, "$45 per year.", "up", None, "dan"),
]


def sqlite_file(path):
    # the contract with the server (serve/feedback.py): table `feedback`, prompt stored as JSON text
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT, model TEXT, "
                   "prompt TEXT, answer TEXT, rating TEXT, correction TEXT, comment TEXT, user TEXT, created_at TEXT)")
        for i, (model, prompt, answer, rating, correction, user) in enumerate(ROWS):
            db.execute("INSERT INTO feedback (response_id, model, prompt, answer, rating, correction, comment, user, "
                       "created_at) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, '2026-01-01T00:00:00+00:00')",
                       (f"chatcmpl-{i}", model, json.dumps(prompt), answer, rating, correction, user))
    return path


def jsonl_file(path):
    path.write_text("".join(json.dumps({"response_id": f"r{i}", "model": m, "prompt": p, "answer": a, "rating": r,
                                        "correction": c, "user": u}) + "\n"
                            for i, (m, p, a, r, c, u) in enumerate(ROWS)))
    return path


@pytest.mark.parametrize("make", [sqlite_file, jsonl_file])
def test_corrections_and_up_down_answers_become_pairs(tmp_path, make):
    records = load_feedback(make(tmp_path / ("feedback.sqlite" if make is sqlite_file else "feedback.jsonl")))
    pairs = to_pairs(records)
    assert [(p["chosen"], p["rejected"], p["source"]) for p in pairs] == [
        ("Monday to Friday, 9 am to 7 pm.", "It is open.", "correction"),
        ("9 to 7 on weekdays.", "It is open.", "up_vs_down"),
        ("$45 per year.", "Free!", "up_vs_down"),  # two identical thumbs-up answers: one pair, not two
    ]
    assert pairs[0]["prompt"] == HOURS
    assert stats(records) == {
        "city@1": {"count": 2, "up": 1, "down": 1, "up_rate": 0.5, "corrections": 1, "users": 2},
        "city@2": {"count": 3, "up": 2, "down": 1, "up_rate": 0.6667, "corrections": 0, "users": 3},
    }


def test_cli_export_writes_pairs_the_preference_loader_reads(tmp_path):
    source, output = sqlite_file(tmp_path / "feedback.sqlite"), tmp_path / "prefs.jsonl"
    result = CliRunner().invoke(app, ["feedback", "export", "--from", str(source), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "3 preference pairs from 5 feedback records" in result.output
    assert len(load_preference_file(output)) == 3
    result = CliRunner().invoke(app, ["feedback", "stats", "--from", str(source)])
    assert result.exit_code == 0 and "city@2" in result.output and "66.7%" in result.output


def test_bad_feedback_is_named_and_nothing_is_written(tmp_path):
    bad = tmp_path / "feedback.jsonl"
    bad.write_text(json.dumps({"model": "m", "prompt": HOURS, "answer": "a", "rating": "meh"}) + "\n")
    with pytest.raises(TailorError, match=r"feedback\.jsonl:1: \"rating\" must be \"up\" or \"down\" \(found 'meh'\)"):
        load_feedback(bad)
    not_db = tmp_path / "feedback.sqlite"
    not_db.write_text("hello")
    with pytest.raises(TailorError, match=r"feedback\.sqlite: not a feedback database"):
        load_feedback(not_db)
    only_up = tmp_path / "up.jsonl"
    only_up.write_text(json.dumps({"model": "m", "prompt": HOURS, "answer": "a", "rating": "up"}) + "\n")
    result = CliRunner().invoke(app, ["feedback", "export", "--from", str(only_up), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code != 0 and not (tmp_path / "o.jsonl").exists()
