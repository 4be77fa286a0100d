"""`tailor data validate` and the check before training: every problem as `file:line: what — how to fix`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tailor.cli.app import app
from tailor.cli.stages import check_training_data
from tailor.data.validate import OPENAI_CHECKS, validate_files, write_valid
from tailor.errors import TailorError
from tests.unit.helpers import tailor

EXAMPLE_QA = Path(__file__).resolve().parents[3] / "examples" / "city-services" / "qa"


def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": role, "content": content} for role, content in turns]})


GOOD = chat(("system", "Be brief."), ("user", "When does the pool open?"), ("assistant", "June 1."))
# one record per problem; the comment is the OpenAI format-check class it falls under, where there is one
BAD_LINES = [
    (GOOD, None),
    ('{"messages": [{"role": "user", "content": "Hi"}', "invalid_json"),
    ("[1, 2]", "not_an_object"),  # data_type
    ('{"prompt": "Hi", "completion": "Hello"}', "missing_messages"),  # missing_messages_list
    ('{"messages": "Hi"}', "messages_not_a_list"),  # missing_messages_list
    ('{"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Hello"}]}', "missing_role"),
    ('{"messages": [{"role": "user", "content": "Hi", "tone": "warm"}, {"role": "assistant", "content": "Yo"}]}',
     "unknown_message_key"),  # message_unrecognized_key
    (chat(("bot", "Hi"), ("assistant", "Hello")), "unknown_role"),  # unrecognized_role
    (chat(("user", "   "), ("assistant", "Hello")), "empty_content"),  # missing_content
    ('{"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}]}',
     "content_not_a_string"),  # missing_content
    (chat(("system", "Be brief."), ("user", "Hi")), "no_assistant_turn"),  # example_missing_assistant_message
    (chat(("user", "Hi"), ("user", "Hello?"), ("assistant", "Hello")), "role_order"),
    (chat(("user", "Hi"), ("system", "Be brief."), ("assistant", "Hello")), "role_order"),
    (chat(("assistant", "Welcome"), ("user", "Hi"), ("assistant", "Hello")), "role_order"),
    (GOOD, "duplicate"),
    (chat(("user", "Q?"), ("assistant", "A.")), None),
]


@pytest.fixture
def bad_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n\n", encoding="utf-8")  # a blank line at the end
    return path


def test_every_problem_is_reported_with_file_line_and_fix(bad_file):
    report = validate_files([bad_file])
    expected = [(number, kind) for number, (_, kind) in enumerate(BAD_LINES, start=1) if kind]
    assert [(p.line, p.kind) for p in report.problems] == expected
    assert report.records == len(BAD_LINES) and [v.line for v in report.valid] == [1, 16]
    for problem in report.problems:
        text = str(problem)
        assert text.startswith(f"{bad_file}:{problem.line}: ") and " — " in text
    by_line = {p.line: str(p) for p in report.problems}
    assert by_line[8].endswith('message 1: "role" must be one of system, user, assistant (found "bot") — '
                               "map the speaker to system, user or assistant")
    assert "unknown key 'tone'" in by_line[7] and "allowed keys are role, content, name, weight" in by_line[7]
    assert "message 2 (user) follows another user turn" in by_line[12]
    assert "message 2 is a system message after the first turn" in by_line[13]
    assert "message 1 (assistant) opens the conversation" in by_line[14]
    assert f"exact duplicate of {bad_file}:1" in by_line[15]
    assert "invalid JSON" in by_line[2]
    # all seven OpenAI classes are covered by this file
    assert list(report.openai_counts()) == list(OPENAI_CHECKS) and len(OPENAI_CHECKS) == 7
    assert all(count >= 1 for count in report.openai_counts().values()), report.openai_counts()


def test_token_limit_uses_the_given_counter(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(chat(("user", "short"), ("assistant", "ok")) + "\n"
                    + chat(("user", "word " * 50), ("assistant", "ok")) + "\n", encoding="utf-8")

    def count_words(messages):
        return sum(len(m["content"].split()) for m in messages)

    report = validate_files([path], count_tokens=count_words, max_tokens=20)
    [problem] = report.problems
    assert str(problem) == (f"{path}:2: 51 tokens, over the limit of 20 — shorten or split the conversation, or "
                            "raise data.max_tokens / --max-tokens")
    assert validate_files([path], count_tokens=count_words).problems == []  # no limit, no count


def test_question_answer_files(tmp_path):
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text('question,answer\nWhen?,Nine.\n,No question\n"Why, then?",Because.\nWhen?,Nine.\n'
                        "Too,many,fields\n", encoding="utf-8")
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text('{"question": "A?", "answer": "B."}\n{"question": "C?"}\n{"instruction": "D?", "output": 4}\n',
                     encoding="utf-8")
    no_header = tmp_path / "plain.csv"
    no_header.write_text("q,a\nx,y\n", encoding="utf-8")
    report = validate_files([csv_file, jsonl, no_header])
    assert [str(p) for p in report.problems] == [
        f'{csv_file}:3: "question" is empty — write the question, or remove the record',
        f"{csv_file}:5: exact duplicate of {csv_file}:2 — remove one copy: duplicates over-weight that example",
        f"{csv_file}:6: more fields than the header has — quote text that contains the delimiter",
        f'{jsonl}:2: no answer (found "question") — add one of the keys answer, response, output, completion',
        f'{jsonl}:3: "output" must be a string (found a number) — write it as text',
        f"{no_header}:1: the header (q, a) has no question or answer column — name the columns question and answer",
    ]
    assert [v.record for v in report.valid] == [{"question": "When?", "answer": "Nine."},
                                                {"question": "Why, then?", "answer": "Because."},
                                                {"question": "A?", "answer": "B."}]


def test_unreadable_inputs_are_problems_not_crashes(tmp_path):
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(b'{"messages": []}\n\xff\xfe\x00garbage\n')
    report = validate_files([tmp_path / "missing.jsonl", tmp_path, binary])
    kinds = [p.kind for p in report.problems]
    assert kinds == ["file_not_found", "file_not_found", "empty_messages", "not_utf8"]
    assert str(report.problems[3]).startswith(f"{binary}:2: not valid UTF-8 text")


def test_the_example_data_is_valid():
    report = validate_files(sorted(EXAMPLE_QA.iterdir()))
    assert report.problems == [] and len(report.valid) == report.records > 50


def test_write_valid_is_atomic_and_keeps_one_format(bad_file, tmp_path):
    report = validate_files([bad_file])
    out = tmp_path / "clean.jsonl"
    assert write_valid(report, out) == 2
    assert [json.loads(line) for line in out.read_text().splitlines()][0] == json.loads(GOOD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "train.jsonl"]  # no temporary file left
    with pytest.raises(TailorError, match="chat records cannot be written as CSV"):
        write_valid(report, tmp_path / "clean.csv")


def test_cli_exit_codes_summary_and_skip_invalid(bad_file, tmp_path):
    runner = CliRunner()
    failed = runner.invoke(app, ["data", "validate", str(bad_file)])
    assert failed.exit_code == 1
    assert f"{bad_file}:8: message 1" in failed.output
    assert "16 records in 1 file(s): 2 valid, 14 invalid" in failed.output
    assert "OpenAI format checks (7): data_type 1, missing_messages_list 2" in " ".join(failed.output.split())
    out = tmp_path / "clean.jsonl"
    skipped = runner.invoke(app, ["data", "validate", str(bad_file), "--skip-invalid", "--output", str(out)])
    assert skipped.exit_code == 0, skipped.output
    assert "wrote 2 valid records" in skipped.output and "dropped 14 invalid" in skipped.output
    assert len(out.read_text().splitlines()) == 2
    assert runner.invoke(app, ["data", "validate", str(out)]).exit_code == 0
    needs_output = runner.invoke(app, ["data", "validate", str(bad_file), "--skip-invalid"])
    assert isinstance(needs_output.exception, TailorError) and "--output" in str(needs_output.exception)


def test_cli_never_prints_a_traceback(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"messages": 1}\n\x00\x01\n[]\n')
    result = tailor("data", "validate", "bad.jsonl", "nothere.csv", "--tokenizer", "nowhere", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "--tokenizer: nowhere is not a tokenizer folder" in result.stderr


def test_token_limit_from_the_cli_with_a_tokenizer_folder(tmp_path, default_model_dir):
    from tailor.models.base import load_tokenizer

    load_tokenizer(default_model_dir).save_pretrained(tmp_path / "tokenizer")
    path = tmp_path / "chat.jsonl"
    path.write_text(chat(("user", "Hi"), ("assistant", "Hello")) + "\n"
                    + chat(("user", "pool hours " * 40), ("assistant", "June.")) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--max-tokens", "40", "--tokenizer",
                                      str(tmp_path / "tokenizer")])
    assert result.exit_code == 1
    assert f"{path}:2: " in result.output and "tokens, over the limit of 40" in result.output
    assert f"{path}:1:" not in result.output


def test_train_refuses_invalid_data_before_loading_a_model(bad_file, tmp_path):
    with pytest.raises(TailorError) as caught:
        check_training_data(bad_file)
    message = str(caught.value)
    assert "14 problem(s) in the training data; nothing was trained" in message
    assert f"{bad_file}:2: invalid JSON" in message and "… and 11 more" in message
    check_training_data(tmp_path / "absent.jsonl")  # missing data is the training core's message to give

    workspace = tmp_path / "ws"
    (workspace / "run" / "data").mkdir(parents=True)
    (workspace / "tailor.yaml").write_text("project: test\nbase_model: /nonexistent/model\n", encoding="utf-8")
    (workspace / "run" / "data" / "train.jsonl").write_text(bad_file.read_text(), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", "-w", str(workspace)])
    # the bad data is reported; the (missing) base model was never looked at
    assert isinstance(result.exception, TailorError), result.output
    assert "problem(s) in the training data" in str(result.exception)


def test_classification_labels_outside_the_set_and_conflicting_labels(tmp_path):
    path = tmp_path / "intents.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"text": "My bill is wrong", "label": "billing"}, {"text": "Power is out on Elm", "label": "outage"},
        {"text": "Where is city hall?", "label": "directions"}, {"text": "my bill is  WRONG", "label": "outage"},
        {"text": "Power is out on Elm", "label": "outage"}, {"text": "Hi", "label": ""}]) + "\n", encoding="utf-8")
    report = validate_files([path], labels=["billing", "outage"])
    by_line = {problem.line: (problem.kind, str(problem)) for problem in report.problems}
    assert {line: kind for line, (kind, _) in by_line.items()} == {
        3: "unknown_label", 4: "conflicting_label", 5: "duplicate", 6: "missing_label"}
    assert by_line[3][1] == (f"{path}:3: label 'directions' is not in the label set (billing, outage) — fix the "
                             f"label's spelling or add it to data.labels")
    assert f"same text as {path}:1 but labelled 'outage' there 'billing'" in by_line[4][1]
    assert [r.record for r in report.valid] == [{"text": "My bill is wrong", "label": "billing"},
                                                {"text": "Power is out on Elm", "label": "outage"}]
    csv_file = tmp_path / "intents.csv"
    csv_file.write_text("text,label\nReport a pothole,roads\nPay my water bill,billing\n", encoding="utf-8")
    report = validate_files([csv_file], labels=["billing"])
    assert [(p.line, p.kind) for p in report.problems] == [(2, "unknown_label")] and len(report.valid) == 1


def test_leakage_between_train_and_eval_is_reported_on_the_eval_line(tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join([chat(("user", "When does the public library open on Saturday mornings?"),
                                     ("assistant", "At nine in the morning.")),
                                chat(("user", "How do I pay a parking ticket?"), ("assistant", "Online."))]) + "\n")
    held_out.write_text("\n".join([
        chat(("system", "Other prompt."), ("user", "When does the public library open on Saturday mornings?"),
             ("assistant", "At nine in the morning.")),  # the same example, another system prompt: a copy
        chat(("user", "When does the public library open on Saturday mornings??"),
             ("assistant", "At nine in the morning!")),  # punctuation only: still a copy
        chat(("user", "Where can I recycle old batteries?"), ("assistant", "At the depot.")),
        json.dumps({"question": "When does the public library open on Saturday mornings please?",
                    "answer": "At nine in the morning."})]) + "\n")
    report = validate_files([train], eval_paths=[held_out])
    leaks = [(p.line, str(p)) for p in report.problems if p.kind == "leakage"]
    assert [line for line, _ in leaks] == [1, 2]
    assert leaks[0][1] == (f"{held_out}:1: held-out example is a copy of training example {train}:1 — remove it "
                           f"from one side: a test the model trained on measures memory, not skill")
    assert [(r.path, r.line) for r in report.valid if r.held_out] == [(str(held_out), 3)]
    # the first record decides the file is chat: a question/answer record after it is a format error
    assert any(p.line == 4 and p.kind == "missing_messages" for p in report.problems)
    near = tmp_path / "near.jsonl"
    near.write_text(chat(("user", "When does the public library open on Saturday mornings in summer?"),
                         ("assistant", "At nine in the morning.")) + "\n")
    (problem,) = validate_files([train], eval_paths=[near], leak_threshold=0.6).problems
    assert problem.kind == "leakage" and "% similar to training example" in str(problem)
    assert validate_files([train], eval_paths=[near], leak_threshold=0.95).problems == []


def test_cli_labels_and_eval_options(tmp_path):
    intents = tmp_path / "intents.jsonl"
    intents.write_text(json.dumps({"text": "Water main broke", "label": "utilities"}) + "\n")
    result = CliRunner().invoke(app, ["data", "validate", str(intents), "--labels", "billing,outage",
                                      "-w", str(tmp_path)])
    assert result.exit_code == 1 and "unknown_label 1" in result.output
    result = CliRunner().invoke(app, ["data", "validate", str(intents), "--eval", str(intents), "-w", str(tmp_path)])
    assert result.exit_code == 1 and "held-out example is a copy of training example" in result.output
    result = CliRunner().invoke(app, ["data", "validate", str(intents), "--eval", str(intents), "--skip-invalid",
                                      "-o", str(tmp_path / "out.jsonl"), "-w", str(tmp_path)])
    assert isinstance(result.exception, TailorError) and "--skip-invalid writes one file" in str(result.exception)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"),
                                        ("header.csv", "question,answer\n")])
def test_an_empty_file_is_an_error_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    (problem,) = validate_files([path]).problems
    assert problem.kind == "empty_file" and str(problem).startswith(f"{path}: empty file: no records")
    check_training_data(path)  # before training, no records is the method's to judge (rag needs none)


@pytest.fixture
def weightless_workspace(tmp_path, tiny_model_dir):
    """A workspace whose base model folder holds the tiny model's config and tokenizer but no weights: the token
    limit must come from the config alone."""
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        if not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, model / item.name)
    (tmp_path / "tailor.yaml").write_text("base_model: model\n", encoding="utf-8")
    return tmp_path


def test_cli_default_token_limit_is_the_model_context_or_data_max_tokens(weightless_workspace):
    path = weightless_workspace / "chat.jsonl"
    # the tiny model reads 1,024 tokens (max_position_embeddings); this answer is longer
    path.write_text(chat(("user", "Hi"), ("assistant", "Hello")) + "\n"
                    + chat(("user", "pool hours " * 600), ("assistant", "June.")) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "validate", str(path), "-w", str(weightless_workspace)])
    assert result.exit_code == 1, result.output
    assert f"{path}:2: " in result.output and "tokens, over the limit of 1024" in result.output
    assert f"{path}:1:" not in result.output

    (weightless_workspace / "tailor.yaml").write_text("base_model: model\ndata:\n  max_tokens: 20\n")
    path.write_text(chat(("user", "Hi"), ("assistant", "Hello")) + "\n"
                    + chat(("user", "pool hours " * 10), ("assistant", "June.")) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "validate", str(path), "-w", str(weightless_workspace)])
    assert result.exit_code == 1 and "over the limit of 20" in result.output
    # --max-tokens still wins over both
    result = CliRunner().invoke(app, ["data", "validate", str(path), "-w", str(weightless_workspace),
                                      "--max-tokens", "1000"])
    assert result.exit_code == 0, result.output


def test_cli_empty_file_exits_nonzero_with_one_line_naming_it(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    result = tailor("data", "validate", "empty.jsonl", "--max-tokens", "100", cwd=tmp_path, columns=200)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert [line for line in result.stdout.splitlines() if "empty file" in line] == [
        "empty.jsonl: empty file: no records — add records (a JSON object per line, or CSV rows under a header), "
        "or leave the file out"]
