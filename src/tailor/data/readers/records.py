"""Record files: CSV/TSV rows, JSON lines and JSON arrays, one Document per record; and chat transcripts in those
same files, one Document per conversation (with its `messages`).

The text of a record is `options.text_field` when configured (a dotted path such as `fields.body` reaches into
nested objects), else the first of the usual names (text, content, body, …), else every text field as
'key: value' lines. A file is a chat transcript when its first record is a whole conversation (OpenAI `messages`,
ShareGPT `conversations`) or one turn of one (a speaker and a text field: speaker,text or from,value); chatlog.py
turns speakers into roles.

JSON lines and CSV are read a record at a time, so memory is bounded by the largest record. A record that cannot be
used (invalid JSON, no text) is reported as `file:line` with a ReaderWarning and the rest of the file is read.
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from tailor.data import chatlog
from tailor.data.readers.registry import Document, ReaderOptions, ReaderWarning, register_reader
from tailor.data.readers.text import MAX_LINE_CHARS, decode_text, decoded_lines, open_bytes, read_bytes
from tailor.errors import TailorError

TEXT_KEYS = ("text", "content", "body", "document", "article", "abstract", "description", "message", "answer")
TITLE_KEYS = ("title", "subject", "heading", "name")
MAX_JSON_BYTES = 256 * 2**20  # a JSON array is parsed whole; larger files should be JSON lines, read a line at a time
MAX_WARNINGS = 20  # per file: a thousand broken lines say nothing twenty do not
# the csv module refuses fields over 128 KiB by default; a long document in one cell is still a document
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class _Warnings:
    """File:line warnings, at most MAX_WARNINGS per file, then one line with the count of the rest."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0

    def __call__(self, line: int, message: str) -> None:
        self.count += 1
        if self.count <= MAX_WARNINGS:
            warnings.warn(f"{self.path}:{line}: {message}; record skipped", ReaderWarning, stacklevel=3)

    def close(self) -> None:
        if self.count > MAX_WARNINGS:
            warnings.warn(f"{self.path}: {self.count - MAX_WARNINGS} more records skipped", ReaderWarning,
                          stacklevel=3)


def _field(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def record_text(record: dict, options: ReaderOptions) -> str | None:
    """The text of one record (see the module docstring); None when it has none."""
    if options.text_field:
        value = _field(record, options.text_field)
        return value if isinstance(value, str) and value.strip() else None
    for key in TEXT_KEYS:
        if isinstance(record.get(key), str) and record[key].strip():
            return record[key]
    lines = [f"{key}: {value.strip()}" for key, value in record.items()
             if isinstance(key, str) and isinstance(value, str) and value.strip()]
    return "\n".join(lines) or None


def _title(record: dict, options: ReaderOptions) -> str | None:
    for key in TITLE_KEYS:
        if key != options.text_field and isinstance(record.get(key), str) and record[key].strip():
            return record[key].strip()[:300]
    return None


def _documents(records: Iterable[tuple[int, dict]], path: Path, options: ReaderOptions) -> Iterator[Document]:
    """Documents from (line, record) pairs: plain records, whole conversations or per-turn transcripts."""
    warn = _Warnings(path)
    records = iter(records)
    first = next(records, None)
    if first is None:
        return
    mode = "records"
    if not options.text_field:
        if chatlog.conversation_turns(first[1]) is not None:
            mode = "conversations"
        elif chatlog.turn_keys(first[1]) is not None:
            mode = "turns"
    roles = chatlog.check_speaker_roles(options.speaker_roles)
    source = str(path)

    def chat_document(line: int, turns: list[tuple[str, str]], title: str | None) -> Document | None:
        try:
            messages = chatlog.turns_to_messages(turns, roles, f"{path}:{line}")
        except TailorError as exc:
            warn(line, str(exc).removeprefix(f"{path}:{line}: "))
            return None
        if not messages:
            warn(line, "conversation without any text")
            return None
        return Document(text=chatlog.render(messages), source=source, title=title, line=line,
                        messages=tuple(messages))

    chained = [first]
    if mode == "turns":
        keys = chatlog.turn_keys(first[1])
        assert keys is not None  # the mode "turns" was chosen by it
        speaker_key, text_key, conversation_key = keys
        turns: list[tuple[str, str]] = []
        current, start = object(), first[0]
        for line, record in _chain(chained, records):
            conversation = record.get(conversation_key) if conversation_key else None
            if conversation != current and turns:
                document = chat_document(start, turns, None if current is None else str(current))
                if document is not None:
                    yield document
                turns = []
            if not turns:
                current, start = conversation, line
            speaker, text = record.get(speaker_key), record.get(text_key)
            if not isinstance(text, str) or not isinstance(speaker, (str, int)):
                warn(line, f'a transcript turn needs a "{speaker_key}" and a "{text_key}" text')
                continue
            turns.append((str(speaker), text))
        if turns:
            document = chat_document(start, turns, None if current is None else str(current))
            if document is not None:
                yield document
    else:
        for line, record in _chain(chained, records):
            if mode == "conversations":
                conversation_turns = chatlog.conversation_turns(record)
                if conversation_turns is None:
                    warn(line, 'expected a conversation ("messages" or "conversations" list of turns)')
                    continue
                document = chat_document(line, conversation_turns, _title(record, options))
                if document is not None:
                    yield document
                continue
            text = record_text(record, options)
            if text is None:
                wanted = f'no text in field "{options.text_field}"' if options.text_field else "no text field"
                warn(line, wanted + " (set ingest.text_field to the field that holds the text)")
                continue
            yield Document(text=text, source=source, title=_title(record, options), line=line)
    warn.close()


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _json_lines(path: Path, warn: _Warnings) -> Iterator[tuple[int, dict]]:
    with open_bytes(path) as handle:
        line_no = 0
        while True:
            # bounded: a file that is one 200 MB line is refused, not loaded
            raw = handle.readline(MAX_LINE_CHARS + 1)
            if not raw:
                break
            line_no += 1
            if len(raw) > MAX_LINE_CHARS:
                raise TailorError(f"{path}:{line_no}: a line longer than {MAX_LINE_CHARS:,} bytes; records this "
                                  f"long are not supported")
            if not raw.strip():
                continue
            if b"\x00" in raw:
                raise TailorError(f"{path}:{line_no}: binary data (contains NUL bytes), not JSON lines")
            try:
                record = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
            except UnicodeDecodeError:
                warn(line_no, "not valid UTF-8")
                continue
            except json.JSONDecodeError as exc:
                warn(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                warn(line_no, f"expected a JSON object, found {type(record).__name__}")
                continue
            yield line_no, record


def read_jsonl(path: Path, options: ReaderOptions) -> Iterator[Document]:
    warn = _Warnings(path)
    try:
        yield from _documents(_json_lines(path, warn), path, options)
    except OSError as exc:
        raise TailorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    warn.close()


def read_json(path: Path, options: ReaderOptions) -> Iterator[Document]:
    """A JSON array of records, an object holding one such array (`{"data": [...]}`), or one record. Read whole:
    JSON has no record boundaries to stream by. `line` is the record's number in the array."""
    try:
        data = json.loads(decode_text(read_bytes(path, MAX_JSON_BYTES), path))
    except json.JSONDecodeError as exc:
        raise TailorError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and chatlog.conversation_turns(data) is None and record_text(data, options) is None:
        arrays = [value for value in data.values() if isinstance(value, list) and value
                  and all(isinstance(item, dict) for item in value)]
        if len(arrays) == 1:
            data = arrays[0]
    records = data if isinstance(data, list) else [data]
    objects = [(number, record) for number, record in enumerate(records, start=1) if isinstance(record, dict)]
    if not objects:
        raise TailorError(f"{path}: no JSON objects to read (expected an array of records)")
    yield from _documents(objects, path, options)


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    # decoded like text files: UTF-8/16 with BOM, legacy and mixed encodings (Excel's "Unicode text" is UTF-16)
    reader = csv.DictReader(decoded_lines(path), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            return
        for row in reader:
            # the key None holds fields beyond the header (an unquoted delimiter); keep them as text
            extra = row.pop(None, None)
            if extra:
                row["_extra"] = delimiter.join(extra)
            yield reader.line_num, {key: value for key, value in row.items() if value is not None}
    except csv.Error as exc:
        raise TailorError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_csv(path: Path, options: ReaderOptions) -> Iterator[Document]:
    yield from _documents(_csv_rows(path, "\t" if path.suffix.lower() == ".tsv" else ","), path, options)


register_reader([".jsonl", ".ndjson"], read_jsonl)
register_reader([".json"], read_json)
register_reader([".csv", ".tsv"], read_csv)
