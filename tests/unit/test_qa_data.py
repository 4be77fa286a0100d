import json

import pytest

from tailor.data.qa import build_chat_datasets, in_eval_split, read_qa_file
from tailor.errors import TailorError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_pairs(tmp_path):
    jsonl = write(tmp_path / "a.jsonl", '{"question": "Q1?", "answer": "A1."}\n\n{"instruction": "Q2?", "output": "A2."}\n')
    csv_file = write(tmp_path / "b.csv", 'question,answer\n"Q3, with comma?",A3.\n')
    pairs = list(read_qa_file(jsonl)) + list(read_qa_file(csv_file))
    assert [(p.question, p.answer) for p in pairs] == [("Q1?", "A1."), ("Q2?", "A2."), ("Q3, with comma?", "A3.")]
    assert pairs[1].source.endswith("a.jsonl:3")
    assert pairs[2].source.endswith("b.csv:2")


@pytest.mark.parametrize("text, expected", [
    ('{"question": "Q?", "answer": "A."}\n{"question": "Q?"\n', r"a\.jsonl:2: invalid JSON"),
    ('{"question": "Q?", "answer": "A."}\n{"question": "Q?"}\n', r"a\.jsonl:2: missing the answer"),
    ('{"question": "Q?", "answer": ""}\n', r"a\.jsonl:1: \"answer\" is empty"),
    ('{"question": 3, "answer": "A"}\n', r"a\.jsonl:1: \"question\" must be a string"),
    ('[1, 2]\n', r"a\.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, text, expected):
    path = write(tmp_path / "a.jsonl", text)
    with pytest.raises(TailorError, match=expected):
        list(read_qa_file(path))


def test_malformed_csv_names_line(tmp_path):
    path = write(tmp_path / "b.csv", "question,answer\nQ1,A1\nQ2,A2,extra\n")
    with pytest.raises(TailorError, match=r"b\.csv:3: more fields than the header"):
        list(read_qa_file(path))


def test_missing_file(tmp_path):
    with pytest.raises(TailorError, match="file not found"):
        list(read_qa_file(tmp_path / "nope.csv"))


def test_split_is_deterministic_and_reports_long_records(tmp_path):
    rows = [{"question": f"Question number {i}?", "answer": f"Answer {i}."} for i in range(200)]
    rows.append({"question": "Long?", "answer": "word " * 300})
    path = write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    count = lambda messages: sum(len(m["content"].split()) for m in messages)  # noqa: E731
    runs = [build_chat_datasets([path], [], system_prompt="Be brief.", eval_fraction=0.2, seed=1, max_tokens=100,
                                count_tokens=count) for _ in range(2)]
    (train, evals, summary), (train2, evals2, _) = runs
    assert train == train2 and evals == evals2
    assert 20 <= len(evals) <= 60 and len(train) + len(evals) == 200
    assert summary.too_long == [f"{path}:201: 303 tokens, over the limit of 100 (data.max_tokens)"]
    assert train[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert in_eval_split("Question number 3?", 0.2, 1) == in_eval_split("question number 3?", 0.2, 1)
