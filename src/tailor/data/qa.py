"""Question/answer files (CSV or JSONL) → chat `messages` records, with a deterministic train/eval split.

Every problem names `file:line`. Records over the token limit are reported and dropped rather than truncated:
a truncated answer would teach the model to stop mid-sentence.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import read_jsonl

QUESTION_KEYS = ("question", "prompt", "instruction", "input")
ANSWER_KEYS = ("answer", "response", "output", "completion")


@dataclass
class QAPair:
    question: str
    answer: str
    source: str  # file:line, kept so every later message can point back to the row


@dataclass
class BuildSummary:
    train: int = 0
    eval: int = 0
    too_long: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval, "too_long": self.too_long, "duplicates": self.duplicates}


def _pick(record: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise TailorError(f"{where}: \"{key}\" must be a string (found {type(value).__name__})")
            if not value.strip():
                raise TailorError(f"{where}: \"{key}\" is empty")
            return value.strip()
    raise TailorError(f"{where}: missing the {what} (expected one of the keys {', '.join(keys)}; "
                      f"found {', '.join(record) or 'none'})")


def read_qa_file(path: Path | str) -> Iterator[QAPair]:
    """Yield the pairs of one CSV or JSONL file (keys: question/answer, or Alpaca's instruction/output)."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line_no, record in read_jsonl(path):
            where = f"{path}:{line_no}"
            yield QAPair(_pick(record, QUESTION_KEYS, where, "question"), _pick(record, ANSWER_KEYS, where, "answer"),
                         where)
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
                    yield QAPair(_pick(row, QUESTION_KEYS, where, "question"),
                                 _pick(row, ANSWER_KEYS, where, "answer"), where)
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


def in_eval_split(text: str, fraction: float, seed: int) -> bool:
    """Deterministic by content: the same question lands on the same side whatever the file order."""
    digest = hashlib.sha256(f"{seed}:{text.strip().lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def build_chat_datasets(qa_files: list[Path], eval_files: list[Path], *, system_prompt: str, eval_fraction: float,
                        seed: int, max_tokens: int, count_tokens) -> tuple[list[dict], list[dict], BuildSummary]:
    """Read every file, convert to chat records, split, and drop (with a report) records over `max_tokens`."""
    if not qa_files:
        raise TailorError("data.qa_files: no question/answer files configured")
    summary = BuildSummary()
    train, evals, seen = [], [], {}

    def accept(pair: QAPair, bucket: list[dict]) -> None:
        key = (pair.question.lower(), pair.answer.lower())
        if key in seen:
            summary.duplicates.append(f"{pair.source}: duplicate of {seen[key]}")
            return
        seen[key] = pair.source
        record = to_chat(pair, system_prompt)
        tokens = count_tokens(record["messages"])
        if tokens > max_tokens:
            summary.too_long.append(f"{pair.source}: {tokens} tokens, over the limit of {max_tokens} "
                                    f"(data.max_tokens)")
            return
        bucket.append(record)

    for path in eval_files:
        for pair in read_qa_file(path):
            accept(pair, evals)
    for path in qa_files:
        for pair in read_qa_file(path):
            split_off = not eval_files and in_eval_split(pair.question, eval_fraction, seed)
            accept(pair, evals if split_off else train)
    if not train:
        raise TailorError(f"{', '.join(map(str, qa_files))}: no usable training records")
    summary.train, summary.eval = len(train), len(evals)
    return train, evals, summary
