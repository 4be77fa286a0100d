"""The `tailor` program as a user runs it: bad input ends in one line and a non-zero exit, never a traceback."""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.helpers import tailor

TAILOR = [sys.executable, "-m", "tailor.cli.app"]


def test_the_real_program_ends_a_user_error_in_one_line(tmp_path):
    """The other tests run the entry point in-process (tests/unit/helpers.py); this one starts the program."""
    result = subprocess.run([*TAILOR, "train"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_clean_error(result, "no tailor.yaml here")


def assert_clean_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr


def test_init_then_unknown_key(tmp_path):
    assert tailor("init", tmp_path / "ws", cwd=tmp_path).returncode == 0
    assert (tmp_path / "ws" / "tailor.yaml").is_file()
    again = tailor("init", tmp_path / "ws", cwd=tmp_path)
    assert_clean_error(again, "already exists")
    bad = tailor("data", "build", "-w", tmp_path / "ws", "train.learnig_rate=1", cwd=tmp_path)
    assert_clean_error(bad, "unknown key 'train.learnig_rate'")


def test_missing_workspace_config(tmp_path):
    assert_clean_error(tailor("train", cwd=tmp_path), "no tailor.yaml here")


def test_malformed_qa_file_names_file_and_line(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "Q?", "answer": "A."}\n{"question": \n')
    (tmp_path / "tailor.yaml").write_text("data:\n  qa_files: [qa.jsonl]\n")
    result = tailor("data", "build", cwd=tmp_path)
    assert_clean_error(result, "qa.jsonl:2: invalid JSON")
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


def test_ingest_missing_and_empty(tmp_path):
    assert_clean_error(tailor("ingest", tmp_path / "nope", "-o", tmp_path / "c.jsonl", cwd=tmp_path), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(tailor("ingest", tmp_path / "empty", "-o", tmp_path / "c.jsonl", cwd=tmp_path))


def test_ingest_writes_corpus_with_provenance(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The pool opens at 6 am on weekdays and 8 am on weekends.\n")
    (docs / "b.md").write_text("# Fees\n\nA dog license costs **$20** per year.\n")
    result = tailor("ingest", docs, "-o", tmp_path / "corpus.jsonl", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert {Path(r["source"]).name for r in records} == {"a.txt", "b.md"}
    assert all({"text", "source", "chunk", "char_start", "char_end"} <= set(r) for r in records)


@pytest.mark.parametrize("how", ["--port", "serve.port="])
def test_serve_port_in_use(tmp_path, tiny_model_dir, how):
    (tmp_path / "tailor.yaml").write_text(f"base_model: {tiny_model_dir}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a dotted override, as every other command takes them, reaches the server like the option does
        args = ["--port", port] if how == "--port" else [f"serve.port={port}"]
        result = tailor("serve", *args, cwd=tmp_path)
    assert_clean_error(result, f"port {port}", "already in use")


def test_serve_and_chat_refuse_an_unknown_override_key(tmp_path):
    for command in ("serve", "chat"):
        assert_clean_error(tailor(command, "serve.prot=8081", cwd=tmp_path), "unknown key 'serve.prot'")


@pytest.mark.parametrize("args", [["train", "--bogus"], ["nosuchcommand"]])
def test_usage_errors_exit_nonzero(tmp_path, args):
    result = tailor(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_terminal_chat_answers_and_quits_on_empty_line(tmp_path, tiny_model_dir):
    (tmp_path / "tailor.yaml").write_text(f"base_model: {tiny_model_dir}\n")
    result = tailor("chat", "--max-tokens", "5", cwd=tmp_path, input="Library hours?\n\n")
    assert result.returncode == 0, result.stderr
    assert "chatting with base" in result.stdout
    assert result.stdout.count("base>") == 1  # one answer, then the empty line ended the session


def help_text(*command: str) -> str:
    from typer.testing import CliRunner

    from tailor.cli.app import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.output


def help_row(text: str, option: str) -> str:
    (row,) = [line for line in text.splitlines() if f" {option} " in line]
    return " ".join(row.strip("│ ").split())


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["serve"], ["data", "validate"], ["keys", "create"]])
def test_help_shows_values_in_words_and_nothing_after_a_flag(command):
    text = help_text(*command)
    # Typer's Python type labels: `<bool>` after a flag reads as if the flag took a value
    assert not re.search(r"<(bool|str|int|float|path|list\[)", text), text
    assert help_row(text, "--help") == "--help Show this message and exit."


def test_help_rows_say_what_each_option_takes():
    train = help_text("train")
    assert "Usage: root train [OPTIONS] [KEY=VALUE]..." in train
    assert help_row(train, "--resume") == "--resume Continue from the last checkpoint."
    assert help_row(train, "--run").startswith("--run -r PATH Run folder")
    assert help_row(train, "KEY=VALUE") == "KEY=VALUE Dotted overrides, e.g. train.learning_rate=1e-4."
    serve = help_text("serve")
    assert help_row(serve, "--port").startswith("--port -p INTEGER Port")
    assert help_row(help_text("eval"), "--fail-under").startswith("--fail-under METRIC=VALUE Exit 1")
    validate = help_text("data", "validate")
    assert help_row(validate, "--max-tokens").startswith("--max-tokens INTEGER [x>=1] Report records longer")
    assert help_row(validate, "--leak-threshold").startswith("--leak-threshold FLOAT [0.01<=x<=1.0] Similarity")
