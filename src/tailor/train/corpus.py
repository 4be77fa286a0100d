"""Corpus chunks (RUN/corpus.jsonl from `tailor ingest`) → causal-LM examples: token blocks with overlap.

Ingest cuts documents into character chunks that overlap; here the chunks of one document are joined back by their
character offsets (the overlap appears once), then cut into blocks of `block_tokens` tokens. Consecutive blocks
share `overlap_tokens` tokens of context, and those shared tokens carry no label in the later block: every token is
learned exactly once, and most tokens still see a long left context (as in sliding-window perplexity).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError
from tailor.train.examples import IGNORE, Example
from tailor.workspace import read_jsonl

CORPUS_FILE = "corpus.jsonl"


@dataclass
class Document:
    key: str  # source and page: chunks of one document join back into one text
    texts: list[str] = field(default_factory=list)  # contiguous stretches (a held-out chunk leaves a gap)
    last_end: int | None = None


def read_corpus(path: Path) -> list[tuple[str, dict]]:
    """(file:line, record) for every corpus record with a non-empty "text"; a missing or empty file stops here."""
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: not found; run `tailor ingest` first (this method trains on the corpus)")
    records = []
    for line_no, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise TailorError(f"{path}:{line_no}: expected a \"text\" string")
        if text.strip():
            records.append((f"{path}:{line_no}", record))
    if not records:
        raise TailorError(f"{path}: no corpus records with text")
    return records


def is_held_out(record: dict, where: str, eval_fraction: float) -> bool:
    """A deterministic share of the chunks, by content: the same chunks are held out on every run."""
    key = record.get("id") or record.get("sha256") or where
    return int(hashlib.sha256(str(key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction


def join_documents(records: list[tuple[str, dict]]) -> list[str]:
    """Chunk texts → document texts, each chunk's overlap with the previous one dropped (by character offsets)."""
    documents: dict[str, Document] = {}
    for where, record in records:
        key = f"{record.get('source', where)}#{record.get('page')}"
        doc = documents.setdefault(key, Document(key))
        text, start, end = record["text"], record.get("char_start"), record.get("char_end")
        located = isinstance(start, int) and isinstance(end, int) and doc.texts and doc.last_end is not None
        if located and start < doc.last_end <= end:
            # ingest repeats the tail of the previous chunk at the start of this one
            doc.texts[-1] += text[doc.last_end - start:]
        elif located and start == doc.last_end:
            doc.texts[-1] += text
        else:
            doc.texts.append(text)
        doc.last_end = end if isinstance(end, int) else None
    return [text for doc in documents.values() for text in doc.texts]


def block_examples(texts: list[str], tokenizer, block_tokens: int, overlap_tokens: int) -> list[Example]:
    """Token blocks of at most `block_tokens`, each document ended by the end-of-text token; labels = input ids,
    except the overlap that only gives context."""
    if not 0 <= overlap_tokens < block_tokens:
        raise TailorError(f"overlap_tokens must be at least 0 and below block_tokens={block_tokens} "
                          f"(found {overlap_tokens})")
    stride = block_tokens - overlap_tokens
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        start = 0
        while True:
            block = ids[start:start + block_tokens]
            context = 0 if start == 0 else overlap_tokens  # tokens a previous block already taught
            labels = [IGNORE] * context + block[context:]
            if len(block) > 1 and any(label != IGNORE for label in labels[1:]):
                examples.append(Example(list(block), labels))
            if start + block_tokens >= len(ids):
                break
            start += stride
    return examples


def corpus_examples(path: Path, tokenizer, *, block_tokens: int, overlap_tokens: int, eval_fraction: float
                    ) -> tuple[list[Example], list[Example]]:
    """Training and held-out blocks from a corpus file; the held-out ones come from held-out chunks."""
    records = read_corpus(path)
    train_records = [(w, r) for w, r in records if not is_held_out(r, w, eval_fraction)]
    eval_records = [(w, r) for w, r in records if is_held_out(r, w, eval_fraction)]
    if not train_records:  # a corpus of one or two chunks: train on them rather than on nothing
        train_records, eval_records = records, []
    return (block_examples(join_documents(train_records), tokenizer, block_tokens, overlap_tokens),
            block_examples(join_documents(eval_records), tokenizer, block_tokens, overlap_tokens))


def corpus_texts(path: Path) -> list[str]:
    """Every document of the corpus as one text (for training a tokenizer)."""
    return join_documents(read_corpus(path))
