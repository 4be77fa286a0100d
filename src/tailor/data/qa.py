"""Question/answer files (CSV or JSONL) → chat `messages` records, with a deterministic train/eval split.

Every problem names `file:line`. Records over the token limit are reported and dropped rather than truncated:
a truncated answer would teach the model to stop mid-sentence.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tailor.data.formats import ANSWER_KEYS, QUESTION_KEYS, pick_field, read_sft_file
from tailor.errors import TailorError
from tailor.workspace import read_jsonl


@dataclass
class QAPair:
    question: str
    answer: str
    source: str  # file:line, kept so every later message can point back to the row


@dataclass
class BuildSummary:
    train: int = 0
    eval: int = 0
    test: int = 0
    too_long: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)  # held-out records dropped as copies of training records
    test_records: list[dict] = field(default_factory=list, repr=False)  # written to data/test.jsonl when asked
    extra: dict = field(default_factory=dict)  # other builders' counts (classification, preference, pretrain)

    def to_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval, "test": self.test, "too_long": self.too_long,
                "duplicates": self.duplicates, "leaked": self.leaked, **self.extra}


def read_qa_file(path: Path | str) -> Iterator[QAPair]:
    """Yield the pairs of one CSV or JSONL file (keys: question/answer, or Alpaca's instruction/output)."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line_no, record in read_jsonl(path):
            where = f"{path}:{line_no}"
            yield QAPair(pick_field(record, QUESTION_KEYS, where, "question"),
                         pick_field(record, ANSWER_KEYS, where, "answer"), where)
    elif suffix in (".csv", ".tsv"):
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                if not reader.fieldnames:
                    raise TailorError(f"{path}:1: empty file; expected a header row with question,answer")
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in row:
                        raise TailorError(f"{where}: more fields than the header has (unquoted comma?)")
                    yield QAPair(pick_field(row, QUESTION_KEYS, where, "question"),
                                 pick_field(row, ANSWER_KEYS, where, "answer"), where)
        except UnicodeDecodeError:
            raise TailorError(f"{path}: not valid UTF-8 text") from None
        except csv.Error as exc:
            raise TailorError(f"{path}: malformed CSV ({exc})") from None
    else:
        raise TailorError(f"{path}: unsupported question/answer file type '{suffix}' (use .csv, .tsv or .jsonl)")


def to_chat(pair: QAPair, system_prompt: str) -> dict:
    messages = [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": messages, "source": pair.source}


def split_position(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by the text and the seed: the same question lands on the same side whatever the
    file order, and a bigger eval share only moves questions from train to eval."""
    digest = hashlib.sha256(f"{seed}:{text.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_eval_split(text: str, fraction: float, seed: int) -> bool:
    return split_position(text, seed) < fraction


def build_chat_datasets(qa_files: list[Path], eval_files: list[Path], *, system_prompt: str, eval_fraction: float,
                        seed: int, max_tokens: int, count_tokens, test_fraction: float = 0.0,
                        leak_threshold: float | None = 0.8, speaker_roles: Mapping[str, str] | None = None
                        ) -> tuple[list[dict], list[dict], BuildSummary]:
    """Read every file (any format of formats.py), convert to chat records, split train/eval/test by content hash,
    drop (with a report) duplicates, records over `max_tokens` and held-out records that leak training ones.

    Positions in [0, eval_fraction) go to eval (only when there are no eval files), the next `test_fraction` to
    test (returned in summary.test_records), the rest to train.
    """
    from tailor.data.dedup import find_leaks

    if not qa_files and not eval_files:
        raise TailorError("data.qa_files: no question/answer files configured")
    summary = BuildSummary()
    train: list[dict] = []
    evals: list[dict] = []
    tests: list[dict] = []
    seen: dict[tuple, tuple[str, list[dict]]] = {}  # record key -> (where first seen, its bucket)

    def accept(example, bucket: list[dict]) -> None:
        key = tuple((m["role"], " ".join(m["content"].lower().split())) for m in example.messages
                    if m["role"] != "system")
        if key in seen:
            first, first_bucket = seen[key]
            if bucket is train or first_bucket is not train:
                summary.duplicates.append(f"{example.source}: duplicate of {first}")
            else:  # a held-out copy of a training record
                summary.leaked.append(f"{example.source}: a copy of training record {first}; dropped from the "
                                      f"held-out set")
            return
        seen[key] = (example.source, bucket)
        messages = list(example.messages)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        tokens = count_tokens(messages)
        if tokens > max_tokens:
            summary.too_long.append(f"{example.source}: {tokens} tokens, over the limit of {max_tokens} "
                                    f"(data.max_tokens)")
            return
        bucket.append({"messages": messages, "source": example.source, **example.meta})

    # training files first, so that a copy in an eval file is reported as leakage, not as a duplicate
    test_start = 0.0 if eval_files else eval_fraction
    for path in qa_files:
        for example in read_sft_file(path, speaker_roles):
            position = split_position(example.prompt, seed)
            if not eval_files and position < eval_fraction:
                accept(example, evals)
            elif test_start <= position < test_start + test_fraction:
                accept(example, tests)
            else:
                accept(example, train)
    for path in eval_files:
        for example in read_sft_file(path, speaker_roles):
            accept(example, evals)
    if qa_files and not train:
        raise TailorError(f"{', '.join(map(str, qa_files))}: no usable training records")
    if leak_threshold:
        def text(record: dict) -> str:
            return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")

        held_out = {record["source"]: record for record in evals + tests}
        leaks = find_leaks([(r["source"], text(r)) for r in train], [(s, text(r)) for s, r in held_out.items()],
                           leak_threshold)
        for source, train_source, similarity in leaks:
            same = "a copy" if similarity >= 1.0 else f"{similarity:.0%} similar"
            summary.leaked.append(f"{source}: {same} of training record {train_source}; dropped from the held-out "
                                  f"set")
        leaked = {source for source, _, _ in leaks}
        evals = [r for r in evals if r["source"] not in leaked]
        tests = [r for r in tests if r["source"] not in leaked]
    summary.train, summary.eval, summary.test, summary.test_records = len(train), len(evals), len(tests), tests
    return train, evals, summary
