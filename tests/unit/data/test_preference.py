"""Preference pairs: every accepted format becomes the canonical record; every problem names file:line."""

import json

import pytest

from tailor.data.preference import load_preference_file
from tailor.errors import TailorError
from tailor.models.base import load_tokenizer
from tailor.train.examples import count_chat_tokens

CANONICAL = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Library hours?"}],
             "chosen": "9 am to 7 pm, says the Library Department.", "rejected": "No idea."}


def write(tmp_path, *records, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_every_format_becomes_prompt_chosen_rejected(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Library hours?\n\nAssistant: 9 to 7.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Library hours?\n\nAssistant: Whatever."}
    ultra_binarized = {"prompt": "Library hours?",
                       "chosen": [{"role": "user", "content": "Library hours?"},
                                  {"role": "assistant", "content": "9 to 7."}],
                       "rejected": [{"role": "user", "content": "Library hours?"},
                                    {"role": "assistant", "content": "Whatever."}]}
    ultra_raw = {"instruction": "Library hours?",
                 "completions": [{"response": "Whatever.", "overall_score": 2.0},
                                 {"response": "9 to 7.", "overall_score": 9.5},
                                 {"response": "Open.", "overall_score": 5}]}
    openai = {"input": {"messages": [{"role": "user", "content": "Library hours?"}]},
              "preferred_output": [{"role": "assistant", "content": "9 to 7."}],
              "non_preferred_output": [{"role": "assistant", "content": "Whatever."}]}
    pairs = load_preference_file(write(tmp_path, CANONICAL, hh, ultra_binarized, ultra_raw, openai))
    assert pairs[0] == CANONICAL
    assert pairs[1] == {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "Library hours?"}],
                        "chosen": "9 to 7.", "rejected": "Whatever."}
    simple = {"prompt": [{"role": "user", "content": "Library hours?"}], "chosen": "9 to 7.", "rejected": "Whatever."}
    assert pairs[2:] == [simple, simple, simple]


@pytest.mark.parametrize("record, message", [
    (CANONICAL | {"rejected": CANONICAL["chosen"]}, "chosen and rejected are the same answer"),
    (CANONICAL | {"chosen": "  "}, "the chosen answer is empty"),
    (CANONICAL | {"prompt": [{"role": "bot", "content": "x"}]}, r"prompt\[0\]\.role must be one of"),
    ({"question": "x", "answer": "y"}, "unrecognized preference record with keys answer, question"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "the chosen and rejected HH transcripts differ before their last assistant turn"),
    ({"instruction": "q",
      "completions": [{"response": "a", "overall_score": 3}, {"response": "b", "overall_score": 3}]},
     "every completion has the same overall_score"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "user", "content": "a"}],
      "non_preferred_output": "b"}, "preferred_output must end with an assistant message"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, record, message):
    path = write(tmp_path, CANONICAL, record)
    with pytest.raises(TailorError, match=rf"prefs\.jsonl:2: {message}"):
        load_preference_file(path)


def test_invalid_json_and_prompts_over_the_context_limit(tmp_path, tiny_model_dir):
    with pytest.raises(TailorError, match=r"prefs\.jsonl:2: invalid JSON"):
        load_preference_file(write(tmp_path, CANONICAL, "{oops"))
    tokenizer = load_tokenizer(tiny_model_dir)
    long = CANONICAL | {"prompt": [{"role": "user", "content": "word " * 300}]}
    path = write(tmp_path, CANONICAL, long, long)
    with pytest.raises(TailorError, match=r"prefs\.jsonl:2: prompt and answer take \d+ tokens, over the limit of "
                                          r"64.*\(and 1 more problem"):
        load_preference_file(path, count_tokens=lambda m: count_chat_tokens(tokenizer, m), max_tokens=64)
    assert len(load_preference_file(write(tmp_path, CANONICAL))) == 1
