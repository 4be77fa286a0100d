"""`tailor data validate`: every problem in chat or question/answer files, as `file:line: what — how to fix`.

Training data errors are cheapest before training: this reads every record, collects every problem instead of
stopping at the first, and never raises on bad input (a file it cannot read, or one without a single record, is
itself a problem).

Chat JSONL (`{"messages": [{"role": ..., "content": ...}, ...]}`) is checked for the seven error classes of
OpenAI's chat fine-tuning format checks (`OPENAI_CHECKS`: data_type, missing_messages_list, message_missing_key,
message_unrecognized_key, unrecognized_role, missing_content, example_missing_assistant_message) and, beyond
them, for role order, the token limit and exact duplicates. Question/answer files (CSV, TSV or JSONL with
question/answer or Alpaca's instruction/output) are checked for missing, empty and non-string fields and
duplicates. Classification files (`{text, label}`) are checked for a missing or empty text, a label outside the
label set, and the same text given two labels. With held-out files (`eval_paths`), a held-out example that is a
copy or near copy of a training example is reported as leakage: it would measure memory, not skill.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tailor.data.dedup import find_leaks
from tailor.data.formats import ANSWER_KEYS, QUESTION_KEYS
from tailor.errors import TailorError
from tailor.workspace import atomic_path, write_jsonl

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")
QA_SUFFIXES = (".csv", ".tsv")
# our kind of problem -> the OpenAI format-check class it falls under (None: a check OpenAI's script does not make)
OPENAI_CHECKS = ("data_type", "missing_messages_list", "message_missing_key", "message_unrecognized_key",
                 "unrecognized_role", "missing_content", "example_missing_assistant_message")
KIND_TO_OPENAI = {
    "not_an_object": "data_type", "message_not_an_object": "data_type",
    "missing_messages": "missing_messages_list", "messages_not_a_list": "missing_messages_list",
    "empty_messages": "missing_messages_list",
    "missing_role": "message_missing_key", "missing_content_key": "message_missing_key",
    "unknown_message_key": "message_unrecognized_key",
    "unknown_role": "unrecognized_role",
    "empty_content": "missing_content", "content_not_a_string": "missing_content",
    "no_assistant_turn": "example_missing_assistant_message",
}

CountTokens = Callable[[list[dict]], int]


@dataclass
class Problem:
    path: str
    line: int | None  # None: the file as a whole
    kind: str
    what: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.what} — {self.fix}"


@dataclass
class ValidRecord:
    path: str
    line: int
    record: dict  # chat: as read; question/answer: {"question", "answer"}; classification: {"text", "label"}
    kind: str  # "chat", "qa" or "classification"
    held_out: bool = False  # read from one of the held-out (eval) files


@dataclass
class ValidationReport:
    files: list[str] = field(default_factory=list)
    records: int = 0  # records read, valid or not
    valid: list[ValidRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def invalid(self) -> int:
        return self.records - len(self.valid)

    def counts_by_kind(self) -> dict[str, int]:
        return dict(Counter(problem.kind for problem in self.problems).most_common())

    def openai_counts(self) -> dict[str, int]:
        counts = Counter(KIND_TO_OPENAI.get(problem.kind) for problem in self.problems)
        return {check: counts.get(check, 0) for check in OPENAI_CHECKS}

    def to_dict(self) -> dict:
        return {"files": self.files, "records": self.records, "valid": len(self.valid), "invalid": self.invalid,
                "problems_by_kind": self.counts_by_kind(), "openai_checks": self.openai_counts(),
                "problems": [str(problem) for problem in self.problems]}


def validate_files(paths: Iterable[Path | str], *, count_tokens: CountTokens | None = None,
                   max_tokens: int | None = None, labels: Iterable[str] | None = None,
                   eval_paths: Iterable[Path | str] = (), leak_threshold: float = 0.8) -> ValidationReport:
    """Check every record of every file; token counts only when both `count_tokens` and `max_tokens` are given.

    `labels`: the label set of classification records (None: any label). `eval_paths`: held-out files, checked
    like the others and then for leakage, a held-out example whose text is at least `leak_threshold` similar
    (Jaccard over word 3-grams) to a training example's; the leaked held-out records are not valid.
    """
    report = ValidationReport()
    # canonical record -> "file:line" of its first occurrence, across the files of one side; a copy across the
    # sides is leakage, reported below
    seen: dict[bool, dict[str, str]] = {False: {}, True: {}}
    seen_texts: dict[bool, dict[str, tuple[str, str]]] = {False: {}, True: {}}  # text -> (label, "file:line")
    label_set = set(map(str, labels)) if labels is not None else None
    held_out_paths = list(map(Path, eval_paths))
    for held_out, path in [(False, p) for p in map(Path, paths)] + [(True, p) for p in held_out_paths]:
        report.files.append(str(path))
        checker = _Checker(str(path), report, seen[held_out], count_tokens if max_tokens else None, max_tokens,
                           labels=label_set, seen_texts=seen_texts[held_out], held_out=held_out)
        try:
            checker.run(path)
        except Exception as exc:  # noqa: BLE001 - a validator must report, never crash; the other files go on
            report.problems.append(Problem(str(path), None, "unreadable", f"could not be read ({type(exc).__name__}:"
                                           f" {exc})", "check that it is a UTF-8 text file in JSONL or CSV form"))
    if held_out_paths:
        _check_leakage(report, leak_threshold)
    return report


def example_text(record: ValidRecord) -> str:
    """What two examples must share to be the same example: every turn but the system prompt."""
    if record.kind == "chat":
        return "\n".join(m["content"] for m in record.record["messages"] if m.get("role") != "system")
    if record.kind == "qa":
        return record.record["question"] + "\n" + record.record["answer"]
    return record.record["text"]


def _check_leakage(report: ValidationReport, threshold: float) -> None:
    place = {id(record): f"{record.path}:{record.line}" for record in report.valid}
    train = [(place[id(r)], example_text(r)) for r in report.valid if not r.held_out]
    held_out = {place[id(r)]: r for r in report.valid if r.held_out}
    leaked = set()
    for label, train_label, similarity in find_leaks(train, [(label, example_text(r)) for label, r in
                                                             held_out.items()], threshold):
        record = held_out[label]
        same = "a copy of" if similarity >= 1.0 else f"{similarity:.0%} similar to"
        report.problems.append(Problem(record.path, record.line, "leakage", f"held-out example is {same} training "
                                       f"example {train_label}", "remove it from one side: a test the model "
                                       "trained on measures memory, not skill"))
        leaked.add(id(record))
    report.valid = [record for record in report.valid if id(record) not in leaked]


class _Checker:
    def __init__(self, path: str, report: ValidationReport, seen: dict[str, str], count_tokens: CountTokens | None,
                 max_tokens: int | None, *, labels: set[str] | None = None,
                 seen_texts: dict[str, tuple[str, str]] | None = None, held_out: bool = False):
        self.path, self.report, self.seen = path, report, seen
        self.count_tokens, self.max_tokens = count_tokens, max_tokens
        self.labels, self.seen_texts, self.held_out = labels, seen_texts if seen_texts is not None else {}, held_out

    def accept(self, line: int, record: dict, kind: str) -> None:
        self.report.valid.append(ValidRecord(self.path, line, record, kind, held_out=self.held_out))

    def problem(self, line: int | None, kind: str, what: str, fix: str) -> None:
        self.report.problems.append(Problem(self.path, line, kind, what, fix))

    def run(self, path: Path) -> None:
        if not path.is_file():
            kind = "a folder" if path.is_dir() else "not found"
            self.problem(None, "file_not_found", f"file {kind}", "name a .jsonl, .csv or .tsv file")
            return
        records, problems = self.report.records, len(self.report.problems)
        if path.suffix.lower() in QA_SUFFIXES:
            self.run_csv(path)
        else:
            self.run_jsonl(path)
        if self.report.records == records and len(self.report.problems) == problems:
            # a file that adds nothing is the wrong file or a failed export more often than an intent
            self.problem(None, "empty_file", "empty file: no records",
                         "add records (a JSON object per line, or CSV rows under a header), or leave the file out")

    # --- JSONL ----------------------------------------------------------------------------------------------------

    def run_jsonl(self, path: Path) -> None:
        file_format = None  # decided by the first object: "messages" makes it chat, question/answer keys QA
        for line_no, raw in _lines(path):
            self.report.records += 1
            if raw is None:
                self.problem(line_no, "not_utf8", "not valid UTF-8 text",
                             "save the file as UTF-8 (most editors offer it under 'Save as' / encoding)")
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                hint = ("a JSON array; write one JSON object per line (JSONL)" if line_no == 1 and
                        raw.lstrip().startswith("[") else "write the record as one JSON object on one line")
                self.problem(line_no, "invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})", hint)
                continue
            if not isinstance(record, dict):
                self.problem(line_no, "not_an_object", f"expected a JSON object, found {_type(record)}",
                             'write each record as {"messages": [...]}')
                continue
            if file_format is None:
                is_qa = "messages" not in record and any(key in record for key in QUESTION_KEYS + ANSWER_KEYS)
                is_classification = "messages" not in record and "label" in record
                file_format = "classification" if is_classification else "qa" if is_qa else "chat"
            if file_format == "classification":
                self.check_classification(line_no, record)
            elif file_format == "qa":
                self.check_qa(line_no, record)
            else:
                self.check_chat(line_no, record)

    def check_chat(self, line: int, record: dict) -> None:
        before = len(self.report.problems)
        messages = record.get("messages")
        if "messages" not in record:
            found = ", ".join(f'"{key}"' for key in record) or "no keys"
            self.problem(line, "missing_messages", f'no "messages" list (found {found})',
                         'add "messages": [{"role": "user", ...}, {"role": "assistant", ...}]')
            return
        if not isinstance(messages, list):
            self.problem(line, "messages_not_a_list", f'"messages" must be a list (found {_type(messages)})',
                         "make it a list of {role, content} objects")
            return
        if not messages:
            self.problem(line, "empty_messages", '"messages" is empty', "add at least a user and an assistant turn")
            return
        roles = []
        for position, message in enumerate(messages, start=1):
            roles.append(self.check_message(line, position, message))
        known = [role for role in roles if role is not None]
        if len(known) == len(roles):
            self.check_order(line, known)
        if "assistant" not in roles:
            self.problem(line, "no_assistant_turn", "no assistant turn to learn from",
                         'add a {"role": "assistant", "content": ...} message with the answer to teach')
        if len(self.report.problems) > before:
            return
        if self.count_tokens is not None and self.max_tokens is not None:
            plain = [{"role": m["role"], "content": m["content"]} for m in messages]
            if not self.within_limit(line, plain):
                return
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if self.duplicate(line, key):
            return
        self.accept(line, record, "chat")

    def check_message(self, line: int, position: int, message) -> str | None:
        """Problems of one message; returns its role when the role is usable for the order check."""
        where = f"message {position}"
        if not isinstance(message, dict):
            self.problem(line, "message_not_an_object", f"{where} is {_type(message)}, not an object",
                         'write it as {"role": ..., "content": ...}')
            return None
        unknown = [key for key in message if key not in MESSAGE_KEYS]
        if unknown:
            self.problem(line, "unknown_message_key", f"{where} has unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(k) for k in unknown)}",
                         f"allowed keys are {', '.join(MESSAGE_KEYS)}; rename or remove the others")
        role = message.get("role")
        if "role" not in message:
            self.problem(line, "missing_role", f'{where} has no "role"', f"add \"role\": one of {', '.join(ROLES)}")
            role = None
        elif role not in ROLES:
            self.problem(line, "unknown_role", f'{where}: "role" must be one of {", ".join(ROLES)} '
                         f"(found {json.dumps(role, ensure_ascii=False)})",
                         "map the speaker to system, user or assistant")
            role = None
        if "content" not in message:
            self.problem(line, "missing_content_key", f'{where} has no "content"', 'add "content": "the text"')
        elif not isinstance(message["content"], str):
            self.problem(line, "content_not_a_string",
                         f'{where}: "content" must be a string (found {_type(message["content"])})',
                         "write the text as one string")
        elif not message["content"].strip():
            self.problem(line, "empty_content", f'{where}: "content" is empty',
                         "write the text of the turn, or remove the message")
        return role

    def check_order(self, line: int, roles: list[str]) -> None:
        """System only first; then user and assistant alternate, starting with the user."""
        for position, role in enumerate(roles, start=1):
            if role == "system" and position > 1:
                self.problem(line, "role_order", f"message {position} is a system message after the first turn",
                             "a system message may only come first; move it there or merge it into the first")
                return
        turns = [(position, role) for position, role in enumerate(roles, start=1) if role != "system"]
        expected = "user"
        for position, role in turns:
            if role != expected:  # the turn before, if any, had this same role
                where = "opens the conversation" if position == turns[0][0] else f"follows another {role} turn"
                self.problem(line, "role_order", f"message {position} ({role}) {where}; "
                             f"user and assistant turns must alternate, starting with the user",
                             f"merge consecutive {role} messages or add the missing {expected} turn")
                return
            expected = "assistant" if role == "user" else "user"

    def within_limit(self, line: int, messages: list[dict]) -> bool:
        assert self.count_tokens is not None and self.max_tokens is not None  # callers check both
        tokens = self.count_tokens(messages)
        if tokens > self.max_tokens:
            self.problem(line, "too_many_tokens", f"{tokens} tokens, over the limit of {self.max_tokens}",
                         "shorten or split the conversation, or raise data.max_tokens / --max-tokens")
            return False
        return True

    def duplicate(self, line: int, key: str) -> bool:
        first = self.seen.get(key)
        if first is not None:
            self.problem(line, "duplicate", f"exact duplicate of {first}",
                         "remove one copy: duplicates over-weight that example")
            return True
        self.seen[key] = f"{self.path}:{line}"
        return False

    # --- question/answer ------------------------------------------------------------------------------------------

    def check_qa(self, line: int, record: dict) -> None:
        question = self.qa_field(line, record, QUESTION_KEYS, "question")
        answer = self.qa_field(line, record, ANSWER_KEYS, "answer")
        if question is None or answer is None:
            return
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if self.count_tokens is not None and self.max_tokens is not None and not self.within_limit(line, messages):
            return
        if self.duplicate(line, json.dumps(["qa", question.strip().lower(), answer.strip().lower()])):
            return
        self.accept(line, {"question": question, "answer": answer}, "qa")

    # --- classification -------------------------------------------------------------------------------------------

    def check_classification(self, line: int, record: dict) -> None:
        text = self.qa_field(line, record, ("text", "input", "sentence", "content"), "text")
        label = record.get("label")
        if label is None or (isinstance(label, str) and not label.strip()):
            self.problem(line, "missing_label", 'no "label"' if label is None else '"label" is empty',
                         "give every example its label")
            return
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            self.problem(line, "label_not_a_string", f'"label" must be a string (found {_type(label)})',
                         "write the label as text, e.g. \"billing\"")
            return
        label = str(label).strip()
        if self.labels is not None and label not in self.labels:
            self.problem(line, "unknown_label", f"label {label!r} is not in the label set "
                         f"({', '.join(sorted(self.labels))})", "fix the label's spelling or add it to data.labels")
            return
        if text is None:
            return
        key = " ".join(text.lower().split())
        first = self.seen_texts.get(key)
        if first is not None and first[0] != label:
            self.problem(line, "conflicting_label", f"same text as {first[1]} but labelled {label!r} there "
                         f"{first[0]!r}", "decide on one label; contradicting examples teach noise")
            return
        if first is not None:
            self.problem(line, "duplicate", f"exact duplicate of {first[1]}",
                         "remove one copy: duplicates over-weight that example")
            return
        self.seen_texts[key] = (label, f"{self.path}:{line}")
        self.accept(line, {"text": text, "label": label}, "classification")

    def qa_field(self, line: int, record: dict, keys: tuple[str, ...], what: str) -> str | None:
        key = next((key for key in keys if key in record), None)
        if key is None:
            found = ", ".join(f'"{k}"' for k in record if k is not None) or "no fields"
            self.problem(line, f"missing_{what}", f"no {what} (found {found})",
                         f"add one of the keys {', '.join(keys)}")
            return None
        value = record[key]
        if not isinstance(value, str):
            self.problem(line, "field_not_a_string", f'"{key}" must be a string (found {_type(value)})',
                         "write it as text")
            return None
        if not value.strip():
            self.problem(line, "empty_field", f'"{key}" is empty', f"write the {what}, or remove the record")
            return None
        return value.strip()

    def run_csv(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            self.problem(None, "not_utf8", f"not valid UTF-8 text (byte {exc.start})", "save the file as UTF-8")
            return
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv"
                                else ",")
        try:
            header = reader.fieldnames
            if not header:
                self.problem(1, "missing_header", "empty file", "start with a header row: question,answer")
                return
            if "label" in header and "text" in header:
                for row in reader:
                    self.report.records += 1
                    self.check_classification(reader.line_num, row)
                return
            missing = [what for what, keys in (("question", QUESTION_KEYS), ("answer", ANSWER_KEYS))
                       if not any(key in header for key in keys)]
            if missing:
                self.problem(1, "missing_header", f"the header ({', '.join(header)}) has no {' or '.join(missing)} "
                             "column", f"name the columns {QUESTION_KEYS[0]} and {ANSWER_KEYS[0]}")
                return
            for row in reader:
                self.report.records += 1
                if None in row:
                    self.problem(reader.line_num, "extra_fields", "more fields than the header has",
                                 "quote text that contains the delimiter")
                    continue
                self.check_qa(reader.line_num, row)
        except csv.Error as exc:
            self.problem(reader.line_num, "malformed_csv", f"malformed CSV ({exc})", "check the quoting")


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each non-blank line; text None where the bytes are not UTF-8."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None
                continue
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield line_no, text


def _type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def write_valid(report: ValidationReport, output: Path | str) -> int:
    """The valid records, atomically: JSONL, or CSV/TSV when `output` asks for it and every record is a QA pair.

    Chat and question/answer files validated together give chat records only (pairs become a user and an
    assistant turn), so the output has one format.
    """
    output = Path(output)
    all_qa = all(record.kind == "qa" for record in report.valid)
    if output.suffix.lower() in QA_SUFFIXES and not all_qa:
        raise TailorError(f"{output}: chat records cannot be written as CSV; use a .jsonl file")
    if output.suffix.lower() in QA_SUFFIXES:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["question", "answer"],
                                    delimiter="\t" if output.suffix.lower() == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(record.record for record in report.valid)
        return len(report.valid)
    return write_jsonl(output, (record.record if all_qa or record.kind != "qa" else _as_chat(record.record)
                                for record in report.valid))


def _as_chat(pair: dict) -> dict:
    return {"messages": [{"role": "user", "content": pair["question"]},
                         {"role": "assistant", "content": pair["answer"]}]}
