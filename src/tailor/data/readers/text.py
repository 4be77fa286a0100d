"""Plain text files (.txt, .txt.gz), read as a stream. Also home of the decoding every text-based reader shares:
`decode_text` (whole bytes: HTML, JSON) and `text_parts` (a stream cut into bounded records: text, Markdown).

Decoding: a byte-order mark decides (UTF-8, UTF-16, UTF-32); else the bytes are read as UTF-8, and every byte that
is not valid UTF-8 is read as cp1252 (latin-1 for its five unassigned bytes). That one rule decodes UTF-8 files,
legacy Western files (cp1252, latin-1) and files mixing both - a UTF-8 file with a pasted latin-1 paragraph -
byte-exactly, where deciding one encoding per file would garble one half. A file with no valid UTF-8 at all whose
bytes charset-normalizer finds to be a non-Latin script (cp1251 Cyrillic, Shift-JIS, ...) is decoded with the
detected encoding instead. Every fallback is reported as a ReaderWarning, so the summary says which files were
guessed at.

Memory: a file is read in blocks of READ_CHARS and cut at paragraph breaks into records of at most
`ReaderOptions.max_record_chars` (else at a line break, else at a space), so a file of any size is never in memory
whole. A stretch of that many characters with no break at all is not prose (a minified or encoded blob, a 200 MB
single line) and the file is refused with that reason.
"""

from __future__ import annotations

import codecs
import gzip
import io
import re
import threading
import unicodedata
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from tailor.data.readers.registry import Document, ReaderOptions, ReaderWarning, register_reader
from tailor.errors import TailorError

# Above this share of control characters a "text" file is really binary (an image or archive renamed .txt).
MAX_CONTROL_SHARE = 0.05
READ_CHARS = 1 << 20  # characters decoded per read: the stream's memory is this plus one record
SAMPLE_BYTES = 65536  # bytes looked at to choose the encoding and to tell text from binary
MAX_LINE_CHARS = 32 * 2**20  # longest line of a line-based file (CSV, JSON lines) read into memory
# control characters (Unicode category Cc: U+0000-U+001F, U+007F-U+009F) other than \t \n \v \f \r
_BINARY_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
# where a record may end when no paragraph or line break is near: after a space or a CJK sentence end
_WORD_BREAKS = (" ", "\t", "\u3002", "\uff01", "\uff1f", "\u3001")

# --- decoding ---------------------------------------------------------------------------------------------------------

# byte -> its cp1252 character; the five bytes cp1252 leaves unassigned keep their latin-1 (C1 control) meaning
_CP1252 = [bytes([byte]).decode("cp1252", errors="ignore") or chr(byte) for byte in range(256)]
_FALLBACK = "tailor-cp1252-fallback"
_active = threading.local()  # the _Decoding whose bytes are being decoded, for the error handler to count into


def _cp1252_fallback(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start:error.end]
    counter = getattr(_active, "decoding", None)
    if counter is not None:
        counter.fallback_bytes += len(bad)
    return "".join(_CP1252[byte] for byte in bad), error.end


codecs.register_error(_FALLBACK, _cp1252_fallback)


@dataclass
class _Decoding:
    """The encoding chosen for one file and what decoding it has had to guess so far."""
    encoding: str
    errors: str = "strict"
    detected: bool = False  # chosen by charset-normalizer
    fallback_bytes: int = 0  # bytes that were not UTF-8, read as cp1252
    non_ascii_chars: int = 0  # non-ASCII characters decoded (a file whose only non-ASCII ones are fallbacks is cp1252)

    def decode(self, read, *args):
        previous, _active.decoding = getattr(_active, "decoding", None), self
        try:
            return read(*args)
        finally:
            _active.decoding = previous

    def count(self, text: str) -> None:
        if not text.isascii():
            self.non_ascii_chars += len(text) - len(text.encode("ascii", "ignore"))

    def note(self, path: Path) -> None:
        """Warn when the text was guessed at: a detected encoding, or bytes read as cp1252."""
        if self.detected:
            warnings.warn(f"{path}: not UTF-8; decoded as {self.encoding} (detected by charset-normalizer)",
                          ReaderWarning, stacklevel=3)
        elif self.fallback_bytes and self.non_ascii_chars > self.fallback_bytes:
            warnings.warn(f"{path}: mixed encodings: {self.fallback_bytes} bytes not valid UTF-8 were decoded as "
                          f"cp1252, the rest as UTF-8", ReaderWarning, stacklevel=3)
        elif self.fallback_bytes:
            warnings.warn(f"{path}: not valid UTF-8, decoded as cp1252", ReaderWarning, stacklevel=3)


def _choose(head: bytes, path: Path, declared: str | None = None, data: bytes | None = None) -> _Decoding:
    """The decoding for a file starting with `head` (`data`: the whole file, when it is in memory)."""
    if head.startswith(_UTF32_BOMS):  # before UTF-16: the UTF-32 LE mark starts with the UTF-16 LE one
        return _Decoding("utf-32")
    if head.startswith(_UTF16_BOMS):
        # checked before the NUL test: UTF-16 text is half NUL bytes yet perfectly good text
        return _Decoding("utf-16")
    if b"\x00" in head:
        raise TailorError(f"{path}: binary data (contains NUL bytes), not a text file")
    if declared and data is not None:
        chosen = _declared(data, declared)
        if chosen is not None:
            return chosen
    decoding = _Decoding("utf-8-sig", _FALLBACK)
    if head.isascii():
        return decoding
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
        return decoding
    except UnicodeDecodeError:
        pass
    trial = _Decoding("utf-8", _FALLBACK)
    trial.count(trial.decode(head.decode, "utf-8", _FALLBACK))
    if trial.non_ascii_chars > trial.fallback_bytes:  # some valid UTF-8 besides: a mixed file
        return decoding
    return _detected(head) or decoding


def _declared(data: bytes, declared: str) -> _Decoding | None:
    """The declared charset (an HTML meta charset) when the bytes fit it; None when unknown or they don't."""
    try:
        encoding = codecs.lookup(declared).name
    except LookupError:
        return None
    if encoding.startswith(("utf-16", "utf-32")):
        return None  # a UTF-16 label on bytes without a byte-order mark is a leftover, not the real encoding
    # as browsers do: pages labelled ISO-8859-1 are really written in its superset cp1252 (curly quotes, euro sign)
    encoding = {"latin-1": "cp1252", "iso8859-1": "cp1252", "utf-8": "utf-8-sig"}.get(encoding, encoding)
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return None
    return _Decoding(encoding)


def _detected(head: bytes) -> _Decoding | None:
    """charset-normalizer's encoding for bytes that are not UTF-8, when it reads them as a non-Latin script.

    Western text is left to the cp1252 fallback: the detector often names a sibling code page (cp1250 for German)
    that decodes a few letters differently, while cp1252 is what such files almost always are."""
    from charset_normalizer import from_bytes

    best = from_bytes(head).best()
    if best is None:
        return None
    letters = [char for char in str(best) if ord(char) > 127 and char.isalpha()]
    non_latin = sum(1 for char in letters if not unicodedata.name(char, "").startswith("LATIN"))
    if not letters or non_latin / len(letters) < 0.5:
        return None
    return _Decoding(best.encoding, "replace", detected=True)


def _check_controls(text: str, path: Path) -> None:
    sample = text[:SAMPLE_BYTES]
    controls = len(_BINARY_CONTROLS.findall(sample))
    if sample and controls / len(sample) > MAX_CONTROL_SHARE:
        raise TailorError(f"{path}: binary data ({controls} of the first {len(sample)} characters are control "
                          f"characters), not a text file")


def decode_text(data: bytes, path: Path, declared: str | None = None) -> str:
    """Decode a whole file's bytes (see the module docstring); `declared`: an HTML meta charset, used when the bytes
    fit it. Binary data raises; a fallback is reported as a ReaderWarning."""
    decoding = _choose(data[:SAMPLE_BYTES], path, declared, data)
    try:
        text = decoding.decode(data.decode, decoding.encoding, decoding.errors)
    except UnicodeDecodeError as exc:
        raise TailorError(f"{path}: starts with a {decoding.encoding.upper()} byte-order mark but is not valid "
                          f"{decoding.encoding.upper()} (byte {exc.start})") from None
    if decoding.encoding.startswith("utf-8") and "\x00" in text:
        raise TailorError(f"{path}: binary data (contains NUL bytes), not a text file")
    _check_controls(text, path)
    decoding.count(text)
    decoding.note(path)
    return text


# --- streams ----------------------------------------------------------------------------------------------------------

@contextmanager
def open_bytes(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed on the fly when its name ends in .gz."""
    try:
        # a GzipFile reads like a binary file, though typeshed does not call it a BinaryIO
        handle = cast(BinaryIO, gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb"))
    except OSError as exc:
        raise TailorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with handle:
        try:
            yield handle
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise TailorError(f"{path}: damaged or truncated gzip file ({exc or type(exc).__name__})") from None


def read_bytes(path: Path, limit: int) -> bytes:
    """A whole file (decompressed when .gz) for readers that need it all at once; over `limit` bytes raises."""
    with open_bytes(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise TailorError(f"{path}: larger than {limit // 2**20} MB, too large to read as one document; split it")
    return data


def decoded_blocks(path: Path) -> Iterator[str]:
    """The file's text in blocks of up to READ_CHARS characters, line endings turned into '\\n'."""
    with open_bytes(path) as raw:
        decoding = _choose(raw.read(SAMPLE_BYTES), path)
        raw.seek(0)  # a gzip stream rewinds by decompressing its start again: cheap for a sample
        # newline=None: \r\n and old Mac \r become \n, also across block boundaries
        stream = io.TextIOWrapper(raw, encoding=decoding.encoding, errors=decoding.errors, newline=None)
        first = True
        while True:
            try:
                block = decoding.decode(stream.read, READ_CHARS)
            except UnicodeDecodeError as exc:
                raise TailorError(f"{path}: starts with a {decoding.encoding.upper()} byte-order mark but is not "
                                  f"valid {decoding.encoding.upper()} ({exc.reason})") from None
            if not block:
                break
            if decoding.encoding.startswith("utf-8") and "\x00" in block:
                raise TailorError(f"{path}: binary data (contains NUL bytes), not a text file")
            if first:
                _check_controls(block, path)
                first = False
            decoding.count(block)
            yield block
        stream.detach()  # `raw` is closed by open_bytes
    decoding.note(path)


def decoded_lines(path: Path, max_chars: int | None = None) -> Iterator[str]:
    """The file's lines, each ending in '\\n' but perhaps the last; a line over `max_chars` raises, so a file that
    is one huge line (a 200 MB dump) is refused rather than held in memory."""
    max_chars = max_chars or MAX_LINE_CHARS
    pending = ""
    for block in decoded_blocks(path):
        lines = (pending + block).split("\n")
        pending = lines.pop()
        for line in lines:
            yield line + "\n"
        if len(pending) > max_chars:
            raise TailorError(f"{path}: a line longer than {max_chars:,} characters; records this long are not "
                              f"supported")
    if pending:
        yield pending


def text_parts(path: Path, max_chars: int) -> Iterator[tuple[int, int, str]]:
    """(line, column, text) records of at most `max_chars` characters: the file cut at paragraph breaks, else line
    breaks, else spaces. `line` and `column` (1-based, in characters) say where each starts in the file."""
    pending, line, offset, line_start = "", 1, 0, 0  # offsets in characters from the start of the file
    for block in decoded_blocks(path):
        pending += block
        while len(pending) > max_chars:
            cut = _cut(pending, max_chars)
            if cut is None:
                raise TailorError(f"{path}: no line break or space in {max_chars:,} characters after character "
                                  f"{offset:,} (minified or encoded data, not prose; ingest.max_record_chars)")
            part, pending = pending[:cut], pending[cut:]
            yield line, offset - line_start + 1, part
            breaks = part.count("\n")
            if breaks:
                line += breaks
                line_start = offset + part.rfind("\n") + 1
            offset += len(part)
    if pending or offset == 0:
        yield line, offset - line_start + 1, pending


def _cut(text: str, limit: int) -> int | None:
    """Where the first record of `text` ends: after its last paragraph break, line break or space before `limit`."""
    for separator in ("\n\n", "\n"):
        found = text.rfind(separator, 1, limit)
        if found > 0:
            return found + len(separator)
    found = max(text.rfind(separator, 1, limit) for separator in _WORD_BREAKS)
    return found + 1 if found > 0 else None


def read_parts(path: Path, options: ReaderOptions, convert=None) -> Iterator[Document]:
    """One Document for a file within `options.max_record_chars`, else one per record (with its `line` and
    `column` when it starts inside a line); `convert(text) -> (text, title)` turns markup into text (Markdown)."""
    convert = convert or (lambda text: (text, None))
    parts = text_parts(path, options.max_record_chars)
    first = next(parts)
    second = next(parts, None)
    if second is None:
        text, title = convert(first[2])
        yield Document(text=text, source=str(path), title=title)
        return
    text, title = convert(first[2])
    yield Document(text=text, source=str(path), title=title, line=first[0])
    for line, column, part in _prepend(second, parts):
        yield Document(text=convert(part)[0], source=str(path), title=title, line=line,
                       column=column if column > 1 else None)


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def read_text(path: Path, options: ReaderOptions) -> Iterator[Document]:
    yield from read_parts(path, options)


register_reader([".txt", ".txt.gz"], read_text)
