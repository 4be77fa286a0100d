"""Supervised fine-tuning files in the formats people have → canonical chat records `{"messages": [...]}`.

One reader for every format, decided per record by its keys, so a folder of mixed exports needs no flags:

    OpenAI chat   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    ShareGPT      {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
    Alpaca        {"instruction": ..., "input": ..., "output": ...}   (input, when given, follows the instruction)
    Q/A           {"question": ..., "answer": ...} (also prompt/response, prompt/completion), JSONL or CSV/TSV
    transcripts   one turn per line or row: speaker,text (+ conversation_id); see chatlog.py

Every problem raises naming `file:line`: `tailor data build` stops on the first bad record, `tailor data validate`
lists them all.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tailor.data import chatlog
from tailor.errors import TailorError
from tailor.workspace import read_jsonl

SFT_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
QUESTION_KEYS = ("question", "prompt", "instruction", "input")
ANSWER_KEYS = ("answer", "response", "output", "completion")


@dataclass
class Example:
    messages: list[dict]
    source: str  # file:line
    # what a question/answer record says of its answer, kept on the chat record: gold_source (the document holding
    # the answer, from its "source" key), answerable (false: the documents do not say), chunk_id (the corpus chunk a
    # synthetic pair was written from)
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The first user turn: what decides the split, so a question lands on one side whatever its answer."""
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")


def pick_field(record: Mapping, keys: tuple[str, ...], where: str, what: str) -> str:
    """The stripped text under the first of `keys` the record has (Q/A and Alpaca records name fields variously)."""
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


def to_messages(record: Mapping, where: str, speaker_roles: Mapping[str, str] | None = None) -> list[dict]:
    """One record of any supported format → alternating {role, content} messages ending with the assistant."""
    roles = dict(speaker_roles or {})
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise TailorError(f'{where}: "messages" must be a non-empty list of {{role, content}} objects')
        turns = []
        for position, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise TailorError(f'{where}: message {position} needs a "role" and a "content" string')
            turns.append((str(message.get("role", "")), message["content"]))
        messages = chatlog.turns_to_messages(turns, roles, where)
    elif (conversation := chatlog.conversation_turns(record)) is not None:  # ShareGPT and friends
        messages = chatlog.turns_to_messages(conversation, roles, where)
    elif "instruction" in record and any(key in record for key in ANSWER_KEYS):
        instruction = pick_field(record, ("instruction",), where, "instruction")
        extra = record.get("input")
        prompt = instruction + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": pick_field(record, ANSWER_KEYS, where, "answer")}]
    else:
        messages = [{"role": "user", "content": pick_field(record, QUESTION_KEYS, where, "question")},
                    {"role": "assistant", "content": pick_field(record, ANSWER_KEYS, where, "answer")}]
    _check(messages, where)
    return messages


def _check(messages: list[dict], where: str) -> None:
    if not any(m["role"] == "user" for m in messages):
        raise TailorError(f"{where}: no user turn; a conversation needs a question to answer")
    if messages[-1]["role"] != "assistant":
        raise TailorError(f"{where}: the conversation ends with a {messages[-1]['role']} turn; it must end with the "
                          f"assistant's answer (the text the model learns)")
    for position, message in enumerate(messages, start=1):
        if message["role"] == "system" and position > 1:
            raise TailorError(f"{where}: a system message may only come first (message {position})")


def read_sft_file(path: Path | str, speaker_roles: Mapping[str, str] | None = None) -> Iterator[Example]:
    """The examples of one file, in any of the module's formats."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SFT_SUFFIXES:
        raise TailorError(f"{path}: unsupported training-data file type '{suffix}' (use .jsonl, .json, .csv or "
                          f".tsv)")
    records = _records(path)
    first = next(records, None)
    if first is None:
        raise TailorError(f"{path}: no records")
    line, record = first
    is_qa = any(key in record for key in QUESTION_KEYS + ANSWER_KEYS) and "messages" not in record
    if not is_qa and chatlog.turn_keys(record) is not None:
        yield from _transcripts(path, speaker_roles)
        return
    yield Example(to_messages(record, f"{path}:{line}", speaker_roles), f"{path}:{line}", _meta(record, is_qa))
    for line, record in records:
        yield Example(to_messages(record, f"{path}:{line}", speaker_roles), f"{path}:{line}", _meta(record, is_qa))


def _meta(record: Mapping, is_qa: bool) -> dict:
    if not is_qa:
        return {}
    meta = {}
    if isinstance(record.get("source"), str) and record["source"].strip():
        meta["gold_source"] = record["source"].strip()
    if isinstance(record.get("answerable"), bool):
        meta["answerable"] = record["answerable"]
    if isinstance(record.get("chunk_id"), str):  # a synthetic pair's source chunk: raft's oracle
        meta["chunk_id"] = record["chunk_id"]
    return meta


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix.lower() in (".csv", ".tsv"):
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                if not reader.fieldnames:
                    raise TailorError(f"{path}:1: empty file; expected a header row such as question,answer")
                for row in reader:
                    if None in row:
                        raise TailorError(f"{path}:{reader.line_num}: more fields than the header has "
                                          f"(unquoted comma?)")
                    yield reader.line_num, row
        except UnicodeDecodeError:
            raise TailorError(f"{path}: not valid UTF-8 text") from None
        except csv.Error as exc:
            raise TailorError(f"{path}: malformed CSV ({exc})") from None
    elif path.suffix.lower() == ".json":
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TailorError(f"{path}: not a JSON file ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise TailorError(f"{path}: expected a JSON array of records (or use JSON lines, .jsonl)")
        yield from enumerate(data, start=1)
    else:
        yield from read_jsonl(path)


def _transcripts(path: Path, speaker_roles: Mapping[str, str] | None) -> Iterator[Example]:
    import warnings

    from tailor.data.readers import ReaderOptions, ReaderWarning, read_document

    options = ReaderOptions(speaker_roles=chatlog.check_speaker_roles(speaker_roles or {}, "data.speaker_roles"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReaderWarning)
        documents = list(read_document(path, options))
    if caught:  # training data is not a corpus: a turn that cannot be used is an error, not a loss
        raise TailorError(str(caught[0].message).removesuffix("; record skipped"))
    for document in documents:
        assert document.messages is not None  # a transcript is read as conversations
        messages = [dict(message) for message in document.messages]
        where = f"{path}:{document.line}"
        while messages and messages[-1]["role"] != "assistant":  # a customer's last unanswered message
            messages.pop()
        _check(messages, where)
        yield Example(messages, where)
