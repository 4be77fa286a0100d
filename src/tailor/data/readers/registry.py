"""One registry of document readers, keyed by file extension. A reader module calls `register_reader(...)` once at
import.

A reader is a generator `read(path) -> Iterator[Document]`, or `read(path, options: ReaderOptions)` for readers that
take options (the text field of JSON records, the speaker roles of chat logs): one Document per file, one per page
for paged formats (PDF), one per record for record formats (CSV, JSON lines) and one per conversation for chat logs.
A problem that loses the whole file raises `TailorError("PATH: why")`; a problem that loses part of it (a PDF page
without a text layer) is reported with `warnings.warn(message, ReaderWarning)`, which `ingest` collects into its
summary, so nothing goes missing silently and a reader needs no extra plumbing to report it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError

# Modules imported on first use; each registers the extensions it reads.
READER_MODULES = ("text", "markdown", "html", "pdf", "docx", "records")


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the path the reader was given
    page: int | None = None  # 1-based page number for paged formats, None otherwise
    title: str | None = None
    line: int | None = None  # 1-based line (JSON lines), row (CSV) or record number (a JSON array) it starts at
    messages: tuple[dict, ...] | None = None  # chat logs: the conversation as {role, content} turns
    column: int | None = None  # 1-based, for a record cut from inside a very long line of a text file (text.py)


@dataclass(frozen=True)
class ReaderOptions:
    """What record and chat-log readers need to know; `ingest.*` in tailor.yaml fills it."""
    text_field: str | None = None  # field holding the text of a JSON/CSV record; None: text, content, body, ...
    speaker_roles: dict[str, str] = field(default_factory=dict)  # chat logs: speaker name -> user or assistant
    max_record_chars: int = 1_000_000  # text and Markdown files are cut into records of at most this many characters

class ReaderWarning(UserWarning):
    """Part of a file could not be read (an empty PDF page, a damaged file read in recovery mode)."""


Reader = Callable[..., Iterator[Document]]  # read(path), or read(path, options) for a reader that takes them

_READERS: dict[str, Reader] = {}
_TAKES_OPTIONS: set[str] = set()  # extensions whose reader accepts `options`
_loaded = False


def register_reader(extensions: Iterable[str], read_fn: Reader) -> Reader:
    extensions = list(extensions)
    if not extensions:
        raise ValueError("register_reader needs at least one extension")
    for extension in extensions:
        if not extension.startswith(".") or len(extension) < 2 or extension != extension.lower():
            raise ValueError(f"reader extension must be lower case and start with a dot (found {extension!r})")
        if extension in _READERS:
            raise ValueError(f"a reader for '{extension}' is already registered")
    takes_options = "options" in inspect.signature(read_fn).parameters
    for extension in extensions:
        _READERS[extension] = read_fn
        if takes_options:
            _TAKES_OPTIONS.add(extension)
    return read_fn


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in READER_MODULES:
            importlib.import_module(f"tailor.data.readers.{module}")


def supported_extensions() -> list[str]:
    _load_all()
    return sorted(_READERS)


def extension_of(path: Path | str) -> str | None:
    """The registered extension `path` is read by: a double one such as '.txt.gz' first, else its last suffix;
    None when no reader handles it."""
    _load_all()
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    for extension in ("".join(suffixes[-2:]), "".join(suffixes[-1:])):
        if extension in _READERS:
            return extension
    return None


def reader_for(path: Path | str) -> Reader:
    """The reader for `path`'s extension (case-insensitive); an unsupported extension raises."""
    extension = extension_of(path)
    if extension is None:
        suffix = Path(path).suffix.lower()
        found = f"'{suffix}'" if suffix else "no extension"
        raise TailorError(f"{path}: unsupported file type ({found}; supported: {', '.join(sorted(_READERS))})")
    return _READERS[extension]


def read_document(path: Path | str, options: ReaderOptions | None = None) -> Iterator[Document]:
    """Read one file with the reader registered for its extension."""
    read = reader_for(path)
    if extension_of(path) in _TAKES_OPTIONS:
        return read(Path(path), options=options or ReaderOptions())
    return read(Path(path))
