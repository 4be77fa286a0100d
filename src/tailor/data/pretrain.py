"""Corpus → token blocks for continued pre-training: each document cut into windows of at most `block_tokens`
tokens, consecutive windows sharing `overlap_tokens`, each written back as the exact text it covers.

Token-aware rather than character-aware because the model's context is counted in tokens: a 1,500-character chunk
is 300 tokens of English prose but 700 of code or a table. Blocks keep their text (not token ids) so the files stay
readable and any tokenizer can re-read them; the offsets mapping of a fast tokenizer says where each token lies.
Documents, not blocks, are split into train and eval: overlapping blocks of one document on both sides would leak.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

from tailor.data.qa import split_position
from tailor.errors import TailorError
from tailor.workspace import read_jsonl


def documents_from_corpus(corpus: Path | str) -> Iterable[tuple[dict, str]]:
    """(provenance, text) per document of a corpus.jsonl, its overlapping chunks stitched back by char offsets."""
    records = [record for _, record in read_jsonl(corpus) if "messages" not in record]
    key = lambda r: (r.get("source"), r.get("page"), r.get("line"))  # noqa: E731
    for (source, page, line), group in groupby(records, key=key):
        text, end = "", 0
        for record in sorted(group, key=lambda r: r.get("chunk", 0)):
            start = record.get("char_start", end)
            if not text:
                text, end = record["text"], start + len(record["text"])
            elif start < end:  # overlap with the previous chunk: only the new part
                text += record["text"][end - start:]
                end = start + len(record["text"])
            else:
                text += "\n\n" + record["text"]
                end = start + len(record["text"])
        yield {"source": source, "page": page, "line": line}, text


def token_blocks(text: str, tokenizer, block_tokens: int, overlap_tokens: int) -> list[tuple[int, int, str]]:
    """(first token, end token, text) of each window; the last window may be shorter."""
    if block_tokens <= 0:
        raise TailorError(f"data.pretrain_block_tokens must be positive (found {block_tokens})")
    if not 0 <= overlap_tokens < block_tokens:
        raise TailorError(f"data.pretrain_overlap_tokens must be smaller than data.pretrain_block_tokens="
                          f"{block_tokens} (found {overlap_tokens})")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    blocks, start = [], 0
    while start < len(offsets):
        end = min(start + block_tokens, len(offsets))
        blocks.append((start, end, text[offsets[start][0]:offsets[end - 1][1]]))
        if end == len(offsets):
            break
        start = end - overlap_tokens
    return blocks


def build_pretrain_blocks(corpus: Path | str, tokenizer, *, block_tokens: int, overlap_tokens: int,
                          eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not Path(corpus).is_file():
        raise TailorError(f"data.pretrain_block_tokens: {corpus} not found; run `tailor ingest` first")
    if not getattr(tokenizer, "is_fast", False):
        raise TailorError("data.pretrain_block_tokens needs a fast tokenizer (offsets mapping)")
    train, evals = [], []
    for provenance, text in documents_from_corpus(corpus):
        held_out = split_position(f"{provenance['source']}\0{provenance['page']}\0{provenance['line']}",
                                  seed) < eval_fraction
        for first, end, block in token_blocks(text, tokenizer, block_tokens, overlap_tokens):
            (evals if held_out else train).append({"text": block, "tokens": end - first, **provenance,
                                                   "token_start": first, "token_end": end})
    if not train:
        raise TailorError(f"{corpus}: no text for pre-training blocks")
    return train, evals
