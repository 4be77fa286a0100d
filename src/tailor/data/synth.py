"""Synthetic question/answer pairs from the corpus: a model reads each chunk and writes pairs; a pair is kept only
when its answer is grounded in that chunk.

Grounded, measurably: the share of the answer's content words (not stop words) that occur in the passage must
reach a threshold, and every number in the answer must occur in the passage (a wrong opening hour is the typical
invention). A small model paraphrases little when it is right and invents freely when it is wrong, so word overlap
separates the two well enough to be a filter; each kept pair carries its score, and the report lists the rejected
ones with theirs, so the threshold can be judged by reading them.

Output records are question/answer JSONL with provenance (`chunk_id`, `source`, `page`), usable as `data.qa_files`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import read_jsonl

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
# function words carry no claim about the passage; answers are judged by the words that do
STOP_WORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further had has have having
he her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now
of off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves yes one get got may might must shall""".split())
PAIR = re.compile(r"(?:^|\n)\s*(?:\d+[.)]\s*)?(?:\*\*)?Q(?:uestion)?\s*\d*\s*[:.]\s*(?:\*\*)?\s*(?P<q>.+?)\s*\n+"
                  r"\s*(?:\*\*)?A(?:nswer)?\s*\d*\s*[:.]\s*(?:\*\*)?\s*(?P<a>.+?)(?=\n\s*(?:\d+[.)]\s*)?(?:\*\*)?"
                  r"Q(?:uestion)?\s*\d*\s*[:.]|\n\s*\n|\Z)", re.IGNORECASE | re.DOTALL)
SYSTEM = "You write question and answer pairs for a help desk, using only facts stated in the passage."
INSTRUCTION = ("Passage:\n{passage}\n\nWrite {count} different questions that a resident could ask and that this "
               "passage answers. After each question write its answer, copied from the facts in the passage. Use "
               "exactly this format:\nQ: <question>\nA: <answer>")


def content_words(text: str) -> list[str]:
    return [word for word in WORD.findall(text.lower()) if word not in STOP_WORDS]


@dataclass
class Grounding:
    score: float  # share of the answer's content words found in the passage
    missing_numbers: list[str] = field(default_factory=list)

    def passes(self, threshold: float) -> bool:
        return self.score >= threshold and not self.missing_numbers


def grounding(answer: str, passage: str) -> Grounding:
    """How much of `answer` the passage supports: content-word overlap, and numbers the passage does not have."""
    words = content_words(answer)
    passage_words = set(content_words(passage))
    score = sum(word in passage_words for word in words) / len(words) if words else 0.0
    passage_numbers = set(NUMBER.findall(passage))
    return Grounding(score, [n for n in NUMBER.findall(answer) if n not in passage_numbers])


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from 'Q: … / A: …' text; repeats (a small model loops) kept once."""
    pairs, seen = [], set()
    for match in PAIR.finditer(text):
        question = " ".join(match.group("q").split()).strip("* ")
        answer = " ".join(match.group("a").split()).strip("* ")
        key = question.lower()
        if question and answer and key not in seen:
            seen.add(key)
            pairs.append((question, answer))
    return pairs


@dataclass
class SynthReport:
    chunks: int = 0
    generated: int = 0
    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    threshold: float = 0.0

    def to_dict(self) -> dict:
        return {"chunks": self.chunks, "generated": self.generated, "kept": len(self.kept),
                "rejected": len(self.rejected), "threshold": self.threshold,
                "kept_share": round(len(self.kept) / self.generated, 3) if self.generated else 0.0,
                "rejected_examples": self.rejected[:50]}


def judge_pairs(pairs: Iterable[tuple[str, str]], chunk: dict, threshold: float, report: SynthReport) -> None:
    """Keep each pair whose answer is grounded in the chunk (into report.kept), else record why not."""
    for question, answer in pairs:
        report.generated += 1
        found = grounding(answer, chunk["text"])
        record = {"question": question, "answer": answer, "grounding": round(found.score, 3),
                  "chunk_id": chunk.get("id"), "source": chunk.get("source"), "page": chunk.get("page")}
        reason = None
        if len(content_words(answer)) < 2:
            reason = "answer has fewer than 2 content words"
        elif " ".join(content_words(answer)) == " ".join(content_words(question)):
            reason = "answer repeats the question"
        elif not found.passes(threshold):
            reason = (f"numbers not in the passage: {', '.join(found.missing_numbers)}" if found.missing_numbers
                      else f"grounding {found.score:.2f} < {threshold}")
        if reason is None:
            report.kept.append(record)
        else:
            report.rejected.append({**record, "reason": reason})


def synthesize(corpus: Path | str, model_ref: str, *, per_chunk: int = 3, max_chunks: int = 0,
               threshold: float = 0.75, max_new_tokens: int = 200, batch_size: int = 4,
               on_chunk: Callable[[int], None] | None = None) -> SynthReport:
    """Generate pairs for the first `max_chunks` chunks (0: all) of a corpus.jsonl and filter them."""
    import torch

    from tailor.evaluate.generate import greedy_answers
    from tailor.models.base import load_model, load_tokenizer

    if not 0 < threshold <= 1:
        raise TailorError(f"--threshold must be above 0 and at most 1 (found {threshold})")
    if not Path(corpus).is_file():
        raise TailorError(f"{corpus}: corpus not found; run `tailor ingest` first")
    chunks = [record for _, record in read_jsonl(corpus) if "messages" not in record and record.get("text")]
    if max_chunks:
        chunks = chunks[:max_chunks]
    if not chunks:
        raise TailorError(f"{corpus}: no text chunks to write questions about")
    tokenizer = load_tokenizer(model_ref)
    model = load_model(model_ref, torch.float32)
    report = SynthReport(chunks=len(chunks), threshold=threshold)
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        conversations = [[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": INSTRUCTION.format(passage=c["text"], count=per_chunk)}]
                         for c in batch]
        outputs = greedy_answers(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
        for chunk, output in zip(batch, outputs):
            judge_pairs(parse_pairs(output)[:per_chunk], chunk, threshold, report)
        if on_chunk is not None:
            on_chunk(len(batch))
    return report
