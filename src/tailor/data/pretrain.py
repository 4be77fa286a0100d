"""Corpus → token blocks for continued pre-training: each document cut into windows of at most `block_tokens`
tokens, consecutive windows sharing `overlap_tokens`, each written back as the exact text it covers.

Token-aware rather than character-aware because the model's context is counted in tokens: a 1,500-character chunk
is 300 tokens of English prose but 700 of code or a table. Blocks keep their text (not token ids) so the files stay
readable and any tokenizer can re-read them; the offsets mapping of a fast tokenizer says where each token lies.
Documents, not blocks, are split into train and eval: overlapping blocks of one document on both sides would leak.
`tailor data build` writes the blocks to RUN/data/pretrain/{train,eval}.jsonl (data.pretrain_block_tokens), and
continued pre-training and training from scratch read them back as examples (`block_examples`): the overlap a block
shares with the previous one is context only, so every token is learned once.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby
from pathlib import Path

from tailor.data.qa import split_position
from tailor.errors import TailorError
from tailor.train.examples import IGNORE, Example
from tailor.workspace import read_jsonl

PRETRAIN_DIR = "pretrain"  # under RUN/data


def documents_from_corpus(corpus: Path | str) -> Iterable[tuple[dict, str]]:
    """(provenance, text) per document of a corpus.jsonl, its overlapping chunks stitched back by char offsets."""
    corpus = Path(corpus)
    if not corpus.is_file():
        raise TailorError(f"{corpus}: not found; run `tailor ingest` first (this method trains on the corpus)")
    records = []
    for line_no, record in read_jsonl(corpus):
        if "messages" in record:
            continue
        if not isinstance(record.get("text"), str):
            raise TailorError(f"{corpus}:{line_no}: expected a \"text\" string")
        if record["text"].strip():
            # a chunk without a source is a document of its own, named by its id or line
            records.append({**record, "source": record.get("source") or record.get("id") or f"{corpus}:{line_no}"})
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
    """Train and eval blocks of the corpus, whole documents held out (a deterministic share by provenance); each
    block records the tokens it shares with the previous one (`context_tokens`) and whether it ends its document."""
    if not getattr(tokenizer, "is_fast", False):
        raise TailorError("data.pretrain_block_tokens needs a fast tokenizer (offsets mapping)")
    train: list[dict] = []
    evals: list[dict] = []
    for provenance, text in documents_from_corpus(corpus):
        key = f"{provenance['source']}\0{provenance['page']}\0{provenance['line']}"
        held_out = split_position(key, seed) < eval_fraction
        previous_end = 0
        blocks = token_blocks(text, tokenizer, block_tokens, overlap_tokens)
        for number, (first, end, block) in enumerate(blocks):
            (evals if held_out else train).append({
                "text": block, "tokens": end - first, **provenance, "token_start": first, "token_end": end,
                "context_tokens": max(0, previous_end - first), "last": number == len(blocks) - 1})
            previous_end = end
    if not train and not evals:
        raise TailorError(f"{corpus}: no text for pre-training blocks")
    if not train:  # a corpus of one or two documents: train on them rather than on nothing
        train, evals = evals, []
    return train, evals


def block_examples(blocks: list[dict], tokenizer) -> list[Example]:
    """Blocks → causal-LM examples: labels on every token but the leading `context_tokens` the previous block
    taught, a document's last block ended by the end-of-text token."""
    examples = []
    for block in blocks:
        ids = tokenizer(block["text"], add_special_tokens=False)["input_ids"]
        if block.get("last", True):
            ids = ids + [tokenizer.eos_token_id]
        context = min(int(block.get("context_tokens", 0)), len(ids))
        labels = [IGNORE] * context + ids[context:]
        if len(ids) > 1 and any(label != IGNORE for label in labels[1:]):
            examples.append(Example(ids, labels))
    return examples


def read_blocks(path: Path) -> list[dict]:
    blocks = []
    for line_no, record in read_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise TailorError(f"{path}:{line_no}: expected a \"text\" string")
        blocks.append(record)
    return blocks
