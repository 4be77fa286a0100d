"""Plain text files (.txt). Also home of `decode_text`, which the HTML reader shares."""

from __future__ import annotations

import codecs
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path

from tailor.data.readers.registry import Document, ReaderWarning, register_reader
from tailor.errors import TailorError

# Above this share of control characters a "text" file is really binary (an image or archive renamed .txt).
MAX_CONTROL_SHARE = 0.05
_TEXT_CONTROLS = frozenset("\n\r\t\f\v")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def decode_text(data: bytes, path: Path, declared: str | None = None) -> str:
    """Decode file bytes: by a byte-order mark, else by the `declared` encoding (an HTML meta charset) when the
    bytes fit it, else as UTF-8, else cp1252, else latin-1. Binary data raises."""
    if data.startswith(codecs.BOM_UTF32_LE) or data.startswith(codecs.BOM_UTF32_BE):
        text = _decode_or_raise(data, "utf-32", path)
    elif data.startswith(_UTF16_BOMS):
        # checked before the NUL test: UTF-16 text is half NUL bytes yet perfectly good text
        text = _decode_or_raise(data, "utf-16", path)
    elif b"\x00" in data:
        raise TailorError(f"{path}: binary data (contains NUL bytes), not a text file")
    else:
        text = _decode_declared(data, declared)
        if text is None:
            text = _decode_guessing(data, path)
    sample = text[:65536]
    controls = sum(1 for char in sample if char not in _TEXT_CONTROLS and unicodedata.category(char) == "Cc")
    if sample and controls / len(sample) > MAX_CONTROL_SHARE:
        raise TailorError(f"{path}: binary data ({controls} of the first {len(sample)} characters are control "
                          f"characters), not a text file")
    return text


def _decode_declared(data: bytes, declared: str | None) -> str | None:
    """The bytes decoded with the declared charset; None when there is none, it is unknown, or the bytes don't fit."""
    try:
        encoding = codecs.lookup(declared).name if declared else None
    except LookupError:
        return None
    if encoding is None or encoding.startswith(("utf-16", "utf-32")):
        return None  # a UTF-16 label on bytes without a byte-order mark is a leftover, not the real encoding
    # as browsers do: pages labelled ISO-8859-1 are really written in its superset cp1252 (curly quotes, euro sign)
    encoding = {"latin-1": "cp1252", "iso8859-1": "cp1252", "utf-8": "utf-8-sig"}.get(encoding, encoding)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        return None


def _decode_guessing(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Legacy Windows/Western files are the common non-UTF-8 case; latin-1 accepts any byte, so it is last.
        for encoding in ("cp1252", "latin-1"):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            warnings.warn(f"{path}: not valid UTF-8 (byte {exc.start}), decoded as {encoding}", ReaderWarning,
                          stacklevel=2)
            return text
        raise AssertionError("latin-1 decodes any byte") from None


def _decode_or_raise(data: bytes, encoding: str, path: Path) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise TailorError(f"{path}: starts with a {encoding.upper()} byte-order mark but is not valid "
                          f"{encoding.upper()} (byte {exc.start})") from None


def read_text(path: Path) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TailorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    yield Document(text=decode_text(data, path), source=str(path))


register_reader([".txt"], read_text)
