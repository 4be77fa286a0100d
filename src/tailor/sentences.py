"""Where an answer's sentences end, so a model told to answer in one sentence stops after it (eval and serve cut
at the same place: serving stops as soon as the next sentence starts, evaluation cuts its greedy answer there)."""

from __future__ import annotations

import re

# a sentence ends at . ! ? (and closing quotes/brackets) followed by space and a capital, digit or opening mark, or
# at a blank line: "i.e. a" and "8 a.m. to" go on, "$50. The" ends
_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s+[A-Z0-9\"'“‘(\[])|\n\s*\n")


def sentence_cut(text: str, sentences: int | None) -> int | None:
    """The offset where `text` holds `sentences` complete sentences with another one begun; None when it does not
    (yet), or when `sentences` is None (no limit)."""
    if not sentences:
        return None
    for count, match in enumerate(_END.finditer(text), start=1):
        if count == sentences:
            return match.end() if not match.group().startswith("\n") else match.start()
    return None


def first_sentences(text: str, sentences: int | None) -> str:
    """`text` up to the end of its first `sentences` sentences (all of it without a limit)."""
    cut = sentence_cut(text, sentences)
    return text if cut is None else text[:cut].rstrip()
