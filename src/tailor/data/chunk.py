"""Split a document into overlapping chunks that end at paragraph or sentence boundaries where possible, so no chunk
starts or stops in the middle of a thought when it can be helped."""

from __future__ import annotations

import re

from tailor.errors import TailorError

# Cut candidates, best first; each is the offset where a chunk may end.
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n")  # ends before the blank line
_LINE_END = re.compile(r"\n")
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*(?=\s)")  # ends after the punctuation
_WORD_END = re.compile(r"\s")
# A chunk may start right after a sentence or line ends, else at the next word.
_SENTENCE_START = re.compile(r"(?:[.!?…。！？][\"'”’)\]]*[ \t]+|\n\s*)(?=\S)")
_WORD_START = re.compile(r"\s+(?=\S)")


def chunk_text(text: str, chunk_chars: int = 1500, overlap: int = 200) -> list[tuple[int, int, str]]:
    """Return (start, end, text[start:end]) for chunks of at most `chunk_chars` characters.

    Consecutive chunks share up to `overlap` characters, moved forward to the next sentence or word start so that
    a chunk never begins mid-word. Chunks have no leading or trailing whitespace.
    """
    if chunk_chars <= 0:
        raise TailorError(f"chunk_chars must be positive (found {chunk_chars})")
    if not 0 <= overlap < chunk_chars:
        raise TailorError(f"chunk_overlap must be at least 0 and smaller than chunk_chars={chunk_chars} "
                          f"(found {overlap})")
    chunks: list[tuple[int, int, str]] = []
    text_end = len(text.rstrip())
    start = _skip_space(text, 0)
    while start < len(text):
        limit = start + chunk_chars
        end = len(text) if limit >= len(text) else _cut(text, start, limit)
        end = start + len(text[start:end].rstrip())
        chunks.append((start, end, text[start:end]))
        if end >= text_end:
            break
        start = _next_start(text, start, end, overlap)
    return chunks


def _cut(text: str, start: int, limit: int) -> int:
    """The best end in the second half of text[start:limit]; a hard cut at `limit` if it has no boundary at all."""
    floor = start + (limit - start) // 2
    for pattern, use_end in ((_PARAGRAPH_END, False), (_LINE_END, False), (_SENTENCE_END, True),
                             (_WORD_END, False)):
        # endpos one past limit lets the sentence pattern's look-ahead see the space that follows a cut at `limit`
        cuts = [match.end() if use_end else match.start() for match in pattern.finditer(text, floor, limit + 1)]
        cuts = [cut for cut in cuts if floor < cut <= limit]
        if cuts:
            return cuts[-1]
    return limit


def _next_start(text: str, start: int, end: int, overlap: int) -> int:
    """Where the chunk after text[start:end] begins: about `overlap` characters back, at a sentence or word start."""
    if overlap == 0:
        return _skip_space(text, end)
    lowest = max(end - overlap, start + 1)  # always move forward, however large the overlap
    for pattern in (_SENTENCE_START, _WORD_START):
        match = pattern.search(text, lowest, end)
        if match and match.end() < end:
            return match.end()
    return _skip_space(text, lowest)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
