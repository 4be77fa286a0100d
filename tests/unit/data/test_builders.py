"""`tailor data build`: every SFT format to canonical messages, deterministic splits with leakage dropped,
stratified classification splits, token blocks for pre-training and preference pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tailor.config import TailorConfig
from tailor.data.build import build_chat_data
from tailor.data.classify import split_classification
from tailor.data.formats import read_sft_file
from tailor.data.pretrain import token_blocks
from tailor.data.qa import build_chat_datasets
from tailor.errors import TailorError

USER_ASSISTANT = [{"role": "user", "content": "When is bulky pickup?"},
                  {"role": "assistant", "content": "The first Monday of the month."}]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_every_sft_format_becomes_the_same_messages(tmp_path):
    sources = {
        "openai.jsonl": [{"messages": USER_ASSISTANT}],
        "sharegpt.jsonl": [{"conversations": [{"from": "human", "value": "When is bulky pickup?"},
                                              {"from": "gpt", "value": "The first Monday of the month."}]}],
        "qa.jsonl": [{"question": "When is bulky pickup?", "answer": "The first Monday of the month."}],
        "alpaca.jsonl": [{"instruction": "When is bulky pickup?", "input": "",
                          "output": "The first Monday of the month."}],
        "transcript.jsonl": [{"speaker": "caller", "text": "When is bulky pickup?"},
                             {"speaker": "agent", "text": "The first Monday"},
                             {"speaker": "agent", "text": "of the month."}],
    }
    for name, records in sources.items():
        (example,) = read_sft_file(write_jsonl(tmp_path / name, records))
        expected = [dict(m) for m in USER_ASSISTANT]
        if name == "transcript.jsonl":  # two agent turns in a row, merged
            expected[1]["content"] = "The first Monday\nof the month."
        assert example.messages == expected, name
        assert example.source == f"{tmp_path / name}:1"
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("prompt,response\nWhen is bulky pickup?,The first Monday of the month.\n", encoding="utf-8")
    assert next(read_sft_file(csv_file)).messages == USER_ASSISTANT
    (alpaca,) = read_sft_file(write_jsonl(tmp_path / "a2.jsonl", [
        {"instruction": "Summarize.", "input": "The pool opens in June.", "output": "Pool: June."}]))
    assert alpaca.messages[0]["content"] == "Summarize.\n\nThe pool opens in June."


def test_sft_format_errors_name_the_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": USER_ASSISTANT},
                                               {"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(TailorError, match=r"bad\.jsonl:2: the conversation ends with a user turn"):
        list(read_sft_file(bad))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"conversations": [{"from": "a", "value": "x"},
                                                                  {"from": "b", "value": "y"},
                                                                  {"from": "c", "value": "z"}]}])
    with pytest.raises(TailorError, match=r"odd\.jsonl:1: cannot tell whether speaker 'c'"):
        list(read_sft_file(odd))


def test_three_way_split_is_deterministic_and_leaks_are_dropped(tmp_path):
    rows = [{"question": f"How do I renew permit number {i} at the city office?", "answer": f"Online, form {i}."}
            for i in range(300)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    count = lambda messages: sum(len(m["content"].split()) for m in messages)  # noqa: E731
    kwargs = {"system_prompt": "", "eval_fraction": 0.1, "seed": 3, "max_tokens": 500, "count_tokens": count,
              "test_fraction": 0.1, "leak_threshold": None}
    train, evals, summary = build_chat_datasets([path], [], **kwargs)
    train2, evals2, summary2 = build_chat_datasets([path], [], **kwargs)
    assert (train, evals, summary.test_records) == (train2, evals2, summary2.test_records)
    assert 10 <= len(evals) <= 50 and 10 <= len(summary.test_records) <= 50
    assert len(train) + len(evals) + summary.test == 300
    sides = [{r["messages"][0]["content"] for r in side} for side in (train, evals, summary.test_records)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    # held-out questions in an eval file that copy or nearly copy training rows are dropped and reported
    leaky = write_jsonl(tmp_path / "eval.jsonl", [
        {"question": "How do I renew permit number 7 at the city office?", "answer": "Online, form 7."},
        {"question": "How do I renew permit number 7 at the city office today?", "answer": "Online, form 7."},
        {"question": "Where is the dog park?", "answer": "Behind the library."}])
    # (row 2 shares 10 of 15 word 3-grams with training row 8: 67% similar)
    train, evals, summary = build_chat_datasets([path], [leaky], **{**kwargs, "leak_threshold": 0.6,
                                                                      "test_fraction": 0.0})
    assert [r["source"] for r in evals] == [f"{leaky}:3"]
    assert summary.leaked[0] == f"{leaky}:1: a copy of training record {path}:8; dropped from the held-out set"
    assert summary.leaked[1].startswith(f"{leaky}:2: ") and "% similar of training record" in summary.leaked[1]


def test_classification_split_is_stratified_and_keeps_rare_labels_in_training():
    records = ([{"text": f"my water bill number {i} is too high", "label": "billing", "source": f"f:{i}"}
                for i in range(40)]
               + [{"text": f"power outage on street {i} tonight", "label": "outage", "source": f"f:{100 + i}"}
                  for i in range(10)]
               + [{"text": "where is city hall", "label": "directions", "source": "f:200"},
                  {"text": "Where is  city hall", "label": "billing", "source": "f:201"}])
    splits = split_classification(records, eval_fraction=0.2, test_fraction=0.1, seed=0, leak_threshold=None)
    counts = splits.counts()["labels"]
    assert counts["billing"] == {"train": 28, "eval": 8, "test": 4}
    assert counts["outage"] == {"train": 7, "eval": 2, "test": 1}
    assert counts["directions"] == {"train": 1, "eval": 0, "test": 0}  # one example: training gets it
    assert splits.labels == ["billing", "directions", "outage"]
    assert splits.duplicates == ["f:201: conflicts with (labelled 'directions' there, 'billing' here) f:200; dropped"]
    again = split_classification(records, eval_fraction=0.2, test_fraction=0.1, seed=0, leak_threshold=None)
    assert again.eval == splits.eval
    other_seed = split_classification(records, eval_fraction=0.2, test_fraction=0.1, seed=1, leak_threshold=None)
    assert other_seed.eval != splits.eval
    # near copies across the split ("bill number 1" vs "bill number 12": 3 of 9 word 3-grams shared) are leakage
    # at a low threshold
    leaky = split_classification(records, eval_fraction=0.2, test_fraction=0.1, seed=0, leak_threshold=0.3)
    assert leaky.leaked and len(leaky.eval) + len(leaky.test) < len(splits.eval) + len(splits.test)


def test_token_blocks_overlap_and_cover_the_text(tiny_model_dir):
    from tailor.models.base import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    text = " ".join(f"Sentence {i} about the recycling schedule." for i in range(40))
    blocks = token_blocks(text, tokenizer, block_tokens=64, overlap_tokens=16)
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert [end - start for start, end, _ in blocks[:-1]] == [64] * (len(blocks) - 1)
    assert all(blocks[i + 1][0] == blocks[i][1] - 16 for i in range(len(blocks) - 1))
    assert blocks[0][2].startswith("Sentence 0") and blocks[-1][1] == total and text.endswith(blocks[-1][2])
    assert all(len(tokenizer(b, add_special_tokens=False)["input_ids"]) <= 66 for _, _, b in blocks)
    with pytest.raises(TailorError, match="pretrain_overlap_tokens must be smaller"):
        token_blocks(text, tokenizer, 16, 16)


def test_data_build_writes_every_configured_dataset(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Question {i}?"},
                                                         {"role": "assistant", "content": f"Answer {i}."}]}
                                          for i in range(30)])
    write_jsonl(tmp_path / "intents.jsonl", [{"text": f"bill {i} wrong", "label": "billing"} for i in range(10)]
                + [{"text": f"no power at {i}", "label": "outage"} for i in range(10)])
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hi?", "chosen": "Hello! How can I help?",
                                            "rejected": "What."}])
    run = tmp_path / "run"
    run.mkdir()
    text = "The recycling center accepts glass, paper and metal. " * 30
    write_jsonl(run / "corpus.jsonl", [{"id": "a", "text": text[:900], "source": "r.txt", "page": None,
                                        "line": None, "chunk": 0, "char_start": 0, "char_end": 900},
                                       {"id": "b", "text": text[800:].strip(), "source": "r.txt", "page": None,
                                        "line": None, "chunk": 1, "char_start": 800, "char_end": len(text) - 1}])
    config = TailorConfig.model_validate(yaml.safe_load(f"""
base_model: {tiny_model_dir}
data:
  qa_files: [chat.jsonl]
  classification_files: [intents.jsonl]
  labels: [billing, outage]
  preference_files: [prefs.jsonl]
  pretrain_block_tokens: 48
  pretrain_overlap_tokens: 8
  eval_fraction: 0.2
  test_fraction: 0.1
"""))
    summary = build_chat_data(config, tmp_path, run)
    data = run / "data"
    lines = lambda path: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    assert summary.train + summary.eval + summary.test == 30 and summary.test == len(lines(data / "test.jsonl")) > 0
    assert lines(data / "train.jsonl")[0]["messages"][0]["role"] == "system"
    assert json.loads((data / "classification" / "labels.json").read_text()) == ["billing", "outage"]
    assert Counter(r["label"] for r in lines(data / "classification" / "eval.jsonl")) == {"billing": 2, "outage": 2}
    assert lines(data / "preferences.jsonl")[0]["chosen"] == "Hello! How can I help?"
    blocks = lines(data / "pretrain" / "train.jsonl") + lines(data / "pretrain" / "eval.jsonl")
    assert "".join(b["text"] for b in blocks[:1]).startswith("The recycling center") and len(blocks) > 3
    assert all(b["tokens"] <= 48 and b["source"] == "r.txt" for b in blocks)
    report = json.loads((data / "report.json").read_text())
    assert report["classification"]["train"] == 14 and report["preference_pairs"] == 1
    bad = config.model_copy(update={"data": config.data.model_copy(update={"labels": ["billing"]})})
    with pytest.raises(TailorError, match=r"intents\.jsonl:11: label 'outage' is not in data\.labels"):
        build_chat_data(bad, tmp_path, run)
