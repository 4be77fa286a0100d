"""Text normalization applied to every document before deduplication and chunking, so that two copies of a text
that differ only in invisible characters or spacing count as the same text."""

from __future__ import annotations

import re
import unicodedata

# Invisible format characters that only get in the way: zero-width space, word joiner, soft hyphen, byte-order mark.
# Zero-width (non-)joiners stay: Persian, Indic scripts and emoji sequences need them.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\u00ad\ufeff\u180e"))
_LINE_BREAKS = re.compile(r"\r\n|[\r\v\x85\u2028]")
_PAGE_BREAKS = re.compile(r"[ \t]*[\f\u2029][ \t]*")
_INNER_SPACE_RUN = re.compile(r"(?<=\S)[ \t]{2,}|(?<=\S)\t")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC, control characters removed (newline and tab kept), spaces collapsed, at most one blank line in a row.

    Leading indentation is kept (code and nested lists read by it); runs of spaces inside a line become one space.
    """
    text = unicodedata.normalize("NFKC", text)  # ligatures, full-width forms, non-breaking spaces -> plain forms
    text = _LINE_BREAKS.sub("\n", text)
    text = _PAGE_BREAKS.sub("\n\n", text)
    text = text.translate(_INVISIBLE)
    text = "".join(char for char in text if char in "\n\t" or unicodedata.category(char) != "Cc")
    text = _INNER_SPACE_RUN.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip("\n").rstrip()
