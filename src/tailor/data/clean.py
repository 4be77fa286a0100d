"""Text normalization applied to every document before deduplication and chunking, so that two copies of a text
that differ only in invisible characters or spacing count as the same text."""

from __future__ import annotations

import re
import unicodedata

# Invisible format characters that only get in the way: zero-width space, word joiner, soft hyphen, byte-order mark.
# Zero-width (non-)joiners stay: Persian, Indic scripts and emoji sequences need them.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\u00ad\ufeff\u180e"))
_LINE_BREAKS = re.compile(r"\r\n|[\r\v\x85\u2028]")
# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F; a regex drops them at C speed (newline, tab stay)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
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
    text = _CONTROLS.sub("", text)
    text = _INNER_SPACE_RUN.sub(" ", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip("\n").rstrip()


# --- boilerplate, quality and language ----------------------------------------------------------------------------

_WORDS = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")
_NOT_ALNUM = re.compile(r"[\W_]+")


def line_key(line: str) -> str:
    """What makes two lines the same line across documents: case and spacing aside."""
    return " ".join(line.lower().split())


def remove_lines(text: str, is_boilerplate) -> str:
    """`text` without the lines `is_boilerplate(line_key(line))` says go, blank-line runs collapsed again."""
    kept = [line for line in text.split("\n") if not line.strip() or not is_boilerplate(line_key(line))]
    return _BLANK_LINES.sub("\n\n", "\n".join(kept)).strip("\n").rstrip()


def quality_problem(text: str, *, max_symbol_ratio: float, max_repeated_ngrams: float) -> str | None:
    """Why a document is not prose worth training on, or None. Two of the Gopher rules (Rae et al., 2021):
    too many symbols (markup debris, tables of numbers, encoded data) and too much repetition (spam, menus and
    generated filler repeated down the page)."""
    # counted with regular expressions at C speed: \s is exactly str.isspace and [\W_] exactly "not str.isalnum"
    visible = len(_SPACES.sub("", text))
    if visible:
        alphanumeric = len(_NOT_ALNUM.sub("", text))
        symbols = (visible - alphanumeric) / visible
        if symbols > max_symbol_ratio:
            return f"{symbols:.0%} of its characters are symbols (ingest.max_symbol_ratio={max_symbol_ratio})"
    words = _WORDS.findall(text.lower())
    if len(words) >= 50:  # repetition says little about a short text
        grams = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
        repeated = 1 - len(set(grams)) / len(grams)
        if repeated > max_repeated_ngrams:
            return (f"{repeated:.0%} of its word 3-grams are repeats (ingest.max_repeated_ngrams="
                    f"{max_repeated_ngrams})")
    return None


_LANGUAGE_SAMPLE = 2000  # characters: enough for a confident guess, cheap on long documents


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the text's language (py3langid, offline, 97 languages); None for text without letters."""
    if not any(char.isalpha() for char in text[:_LANGUAGE_SAMPLE]):
        return None
    import py3langid

    return py3langid.classify(text[:_LANGUAGE_SAMPLE])[0]
