"""PDF files (.pdf): one Document per page, numbered from 1, so a record can cite the page it came from.

A page without a text layer (a scanned image) yields nothing and is reported; a file that is encrypted, damaged
beyond repair or has no text at all raises with the reason.

pypdf opens the file (encryption, damage and repairs, the title) and PDFium (pypdfium2) extracts each page's text.
PDFium places word breaks by the glyphs' positions; pypdf decides them from the font's declared space width, and on
PDFs typeset by TeX, whose word gaps are pen moves rather than space characters, it runs words together whenever
that width is off ("Hereareafewbasicmethods" on every justified line of Debian Reference's PDF).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pypdfium2
from pypdf import PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

from tailor.data.readers.registry import Document, ReaderWarning, register_reader
from tailor.errors import TailorError

# "recom-\nmendation" -> "recommendation": PDFs keep the typesetter's hyphenation. Only between lower-case letters,
# so "COVID-\n19" and "Jean-\nPaul" keep their hyphen.
_HYPHENATED_BREAK = re.compile(r"(?<=[a-z])-\n(?=[a-z])")
# PDFium marks a hyphen it found at a line end as U+FFFE and drops the line break: "distri\ufffebution"
_PDFIUM_HYPHEN = "\ufffe"


@contextmanager
def _pypdf_messages() -> Iterator[list[str]]:
    """Collect what pypdf logs while repairing a damaged file, instead of letting it print to stderr."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("pypdf")
    handler, propagate = Collect(level=logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def read_pdf(path: Path) -> Iterator[Document]:
    with _pypdf_messages() as repairs:
        try:
            pdf = PdfReader(path)
            if pdf.is_encrypted:
                # Many PDFs are encrypted only to restrict printing and open with the empty password.
                if not pdf.decrypt(""):
                    raise TailorError(f"{path}: encrypted PDF that needs a password; decrypt it first "
                                      f"(for example `qpdf --decrypt --password=... in.pdf out.pdf`)")
            title = _title(pdf)
            page_count = len(pdf.pages)
        except TailorError:
            raise
        except FileNotDecryptedError:
            raise TailorError(f"{path}: encrypted PDF that needs a password; decrypt it first") from None
        except DependencyError as exc:
            raise TailorError(f"{path}: encrypted PDF; reading it needs an extra package ({exc})") from None
        except (PdfReadError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # pypdf raises a variety of types on truncated or malformed files
            raise TailorError(f"{path}: damaged, truncated or not a PDF ({_describe(exc)})") from None
        if page_count == 0:
            raise TailorError(f"{path}: damaged or empty PDF (no pages found)")
        try:
            pages = pypdfium2.PdfDocument(path)  # PDFium tries the empty password itself
        except pypdfium2.PdfiumError as exc:
            raise TailorError(f"{path}: damaged, truncated or not a PDF ({_describe(exc)})") from None

        empty_pages, failed_pages = [], []
        try:
            for number in range(1, min(page_count, len(pages)) + 1):
                try:
                    text = _page_text(pages, number - 1)
                except Exception as exc:  # noqa: BLE001 - one broken page must not lose the rest of the document
                    failed_pages.append(f"{number} ({_describe(exc)})")
                    continue
                if not text.strip():
                    empty_pages.append(number)
                    continue
                yield Document(text=text, source=str(path), page=number, title=title)
        finally:
            pages.close()

    if len(empty_pages) + len(failed_pages) == page_count:
        if failed_pages:
            raise TailorError(f"{path}: no page could be read (page {failed_pages[0]})")
        raise TailorError(f"{path}: no text on any of its {page_count} pages (a scanned document? run OCR on it "
                          f"first, for example with ocrmypdf)")
    if empty_pages:
        warnings.warn(f"{path}: no text on page{'s' if len(empty_pages) > 1 else ''} "
                      f"{_page_list(empty_pages)} (scanned images? those pages were skipped)", ReaderWarning,
                      stacklevel=2)
    if failed_pages:
        warnings.warn(f"{path}: could not read page{'s' if len(failed_pages) > 1 else ''} "
                      f"{', '.join(failed_pages)}; skipped", ReaderWarning, stacklevel=2)
    if repairs:
        more = f" and {len(repairs) - 1} more" if len(repairs) > 1 else ""
        warnings.warn(f"{path}: damaged PDF read in recovery mode ({repairs[0]}{more}); check the text",
                      ReaderWarning, stacklevel=2)


def _page_text(pages: pypdfium2.PdfDocument, index: int) -> str:
    page = pages[index]
    try:
        text_page = page.get_textpage()
        try:
            text = text_page.get_text_range()
        finally:
            text_page.close()
    finally:
        page.close()
    text = text.replace("\r\n", "\n").replace(_PDFIUM_HYPHEN, "")
    return _HYPHENATED_BREAK.sub("", text)


def _title(pdf: PdfReader) -> str | None:
    try:
        title = pdf.metadata.title if pdf.metadata else None
    except Exception:  # noqa: BLE001 - a broken info dictionary only costs the title
        return None
    return str(title).strip() or None if title else None


def _page_list(pages: list[int]) -> str:
    shown = ", ".join(map(str, pages[:10]))
    return shown + (f" and {len(pages) - 10} more" if len(pages) > 10 else "")


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


register_reader([".pdf"], read_pdf)
