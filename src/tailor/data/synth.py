"""Synthetic question/answer pairs from the corpus: a model reads each chunk and writes pairs; a pair is kept only
when its answer is grounded in that chunk.

Grounded, measurably: the share of the answer's content words (not stop words) that occur in the passage must
reach a threshold, and every number in the answer must occur in the passage (a wrong opening hour is the typical
invention). A small model paraphrases little when it is right and invents freely when it is wrong, so word overlap
separates the two well enough to be a filter; each kept pair carries its score, and the report lists the rejected
ones with theirs, so the threshold can be judged by reading them.

Output records are question/answer JSONL with provenance (`chunk_id`, `source`, `page`), usable as `data.qa_files`;
`raft` takes `chunk_id` as each pair's oracle passage.

The teacher is any model: one tailor loads (decoded by the serving engine: continuous batching, bf16 where the CPU
runs it fast), or any OpenAI-compatible endpoint (`endpoint:URL#MODEL`: a bigger local model, a hosted one), asked
several requests at a time. Chunks are taken round-robin over the documents, so a sample covers every document, not
the first files in name order. Each kept question is also asked for in other words (`phrasings`), the answer and
oracle unchanged: several phrasings per fact is what lets a small model learn the fact rather than one wording. Every
finished chunk is appended to a progress file beside the output, so a run stopped by a failing endpoint resumes where
it stopped.

An optional judge (`judge`: a model opened by `tailor.evaluate.sources.open_model`, so a bigger local model or an
endpoint) scores each grounded pair 1-5 for being a correct answer to its question according to the passage; pairs
below `min_judge_score` are rejected with their score. Measured: the default 135M model cannot judge (on 30 kept
city pairs against the same questions with another chunk's answer, its expected scores separate them no better
than chance, AUC 0.45), so the filter is off unless a judge is named.
"""

from __future__ import annotations

import json
import random
import re
import time
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


# the statement alone, no passage and no system message: measured on Privoxy's manual with the 135M default model,
# 11 of 16 fact sentences got a question about them this way, 0 of 16 with a system message, 1 of 16 few-shot
QUESTION_FOR = "Turn this statement into the question it answers.\nStatement: {answer}\nQuestion:"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n+")
MODES = ("answer-first", "free")
PHRASE = ("Question: {question}\n\nWrite {count} other ways a resident could ask exactly this question, one per "
          "line, without answering it.")
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*")


@dataclass
class SynthReport:
    chunks: int = 0
    generated: int = 0
    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    threshold: float = 0.0
    teacher: str = ""
    documents: int = 0  # documents in the corpus
    phrasings: int = 0  # kept pairs that re-ask a kept question in other words
    resumed_chunks: int = 0  # chunks taken from the progress file of an earlier, interrupted run
    seconds: float = 0.0
    covered_chunks: set = field(default_factory=set)
    covered_documents: set = field(default_factory=set)

    def to_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for rejected in self.rejected:
            # "grounding 0.50 < 0.75" and "judge score 2 < 3" count by kind, not by value
            kind = re.split(r" [\d.]+ <", rejected["reason"].split(":")[0])[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        return {"teacher": self.teacher, "chunks": self.chunks, "documents": self.documents,
                "generated": self.generated, "kept": len(self.kept), "rejected": len(self.rejected),
                "phrasings": self.phrasings, "threshold": self.threshold,
                "kept_share": round((len(self.kept) - self.phrasings) / self.generated, 3) if self.generated else 0.0,
                "coverage": {"chunks_with_pairs": len(self.covered_chunks),
                             "documents_with_pairs": len(self.covered_documents),
                             "chunk_share": round(len(self.covered_chunks) / self.chunks, 3) if self.chunks else 0.0,
                             "document_share": round(len(self.covered_documents) / self.documents, 3)
                             if self.documents else 0.0},
                "rejected_by_reason": reasons, "resumed_chunks": self.resumed_chunks,
                "seconds": round(self.seconds, 1),
                "chunks_per_s": round(self.chunks / self.seconds, 3) if self.seconds else None,
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


class EngineTeacher:
    """A model tailor loads, decoded by the serving engine (continuous batching; bf16 where the CPU runs it fast)."""

    def __init__(self, model_ref: str, *, batch_size: int = 16, dtype: str = "auto"):
        from tailor.serve.engine import Engine

        self.name = model_ref
        self.batch_size = batch_size
        self.engine = Engine(model_ref, dtype=dtype, max_batch_size=batch_size, max_queue=4 * batch_size,
                             request_timeout=None)

    def complete(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        texts = []
        for start in range(0, len(conversations), 4 * self.batch_size):  # within the engine's queue
            generations = [self.engine.stream(self.engine.base_name, conversation, max_tokens=max_new_tokens,
                                              temperature=0.0)
                           for conversation in conversations[start:start + 4 * self.batch_size]]
            texts += [generation.text() for generation in generations]
        return texts

    def close(self) -> None:
        self.engine.shutdown()


class EndpointTeacher:
    """Any OpenAI-compatible server (`endpoint:URL#MODEL`), asked `concurrency` requests at a time."""

    def __init__(self, url: str, model: str, *, concurrency: int = 8, timeout: float = 120.0):
        import os

        from openai import OpenAI

        self.name, self.url, self.model, self.concurrency = f"{url}#{model}", url, model, concurrency
        self.client = OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=timeout,
                             max_retries=2)

    def complete(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        import openai

        def ask(conversation: list[dict]) -> str:
            # ignored: plain {role, content} dicts, which the client sends as they are; its TypedDict union of
            # message kinds cannot be inferred from a dict
            reply = self.client.chat.completions.create(model=self.model, messages=conversation,  # type: ignore[arg-type]
                                                        temperature=0.0, max_tokens=max_new_tokens)
            return reply.choices[0].message.content or ""

        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(ask, conversations))
        except openai.APIError as exc:
            raise TailorError(f"--teacher: {self.url} failed ({type(exc).__name__}: {exc}); the chunks done so far "
                              f"are kept: run the same command again to resume") from None

    def close(self) -> None:
        self.client.close()


def open_teacher(spec: str, *, root: Path | None = None, batch_size: int = 16, dtype: str = "auto"):
    """`endpoint:URL#MODEL` (checked to answer first), else a model tailor loads (bundled name, folder, hub id)."""
    from tailor.evaluate.sources import ENDPOINT_PREFIX, check_endpoint, parse_spec

    if spec.startswith(ENDPOINT_PREFIX):
        model_spec = parse_spec("teacher", spec, root=root or Path.cwd(), run_dir=Path.cwd(), where="--teacher")
        check_endpoint(model_spec)
        return EndpointTeacher(model_spec.target, model_spec.remote_model)
    from tailor.models.base import resolve_base_model

    return EngineTeacher(resolve_base_model(spec, root=root), batch_size=batch_size, dtype=dtype)


def spread(chunks: list[dict], count: int, seed: int = 0) -> list[dict]:
    """`count` chunks (0: all) taken round-robin over the documents, each document's chunks in a seeded order: a
    sample of any size covers as many documents as it can, not the first files in name order."""
    by_document: dict[str, list[dict]] = {}
    for chunk in chunks:
        by_document.setdefault(str(chunk.get("source", "")), []).append(chunk)
    rng = random.Random(seed)
    queues = []
    for document_chunks in by_document.values():
        order = list(document_chunks)
        rng.shuffle(order)
        queues.append(order)
    picked: list[dict] = []
    depth = 0
    while any(depth < len(queue) for queue in queues) and (not count or len(picked) < count):
        for queue in queues:
            if depth < len(queue) and (not count or len(picked) < count):
                picked.append(queue[depth])
        depth += 1
    return picked


def fact_sentences(text: str, count: int) -> list[str]:
    """Up to `count` sentences of a chunk worth asking about, spread over it: 6 to 40 words, most facts first (a
    number, a name, a time), then the longer ones. They become answers word for word (answer-first generation)."""
    sentences = [_LIST_MARK.sub("", " ".join(part.split())) for part in _SENTENCE.split(text)]
    candidates = [(i, sentence) for i, sentence in enumerate(sentences)
                  if 6 <= len(sentence.split()) <= 40 and sentence[-1:] in ".!?" and len(content_words(sentence)) >= 4]

    def facts(sentence: str) -> int:
        return len(NUMBER.findall(sentence)) + sum(word[:1].isupper() for word in sentence.split()[1:])

    best = sorted(candidates, key=lambda item: (-facts(item[1]), -len(item[1])))[:count]
    return [sentence for _, sentence in sorted(best)]  # in document order


def question_of(text: str, answer: str) -> str | None:
    """The question in a teacher's reply to QUESTION_FOR: the first question in it (a small teacher may say more
    around it) that shares a content word with the answer (else it asks about something else)."""
    answer_words = set(content_words(answer))
    for line in text.splitlines():
        line = _LIST_MARK.sub("", line).strip().strip('"*')
        line = re.sub(r"^(?:Q(?:uestion)?\s*\d*\s*[:.]\s*)", "", line, flags=re.I).strip()
        for question in re.findall(r"[^.!?]*\?", line):  # the question sentences of the line
            question = question.rsplit(":", 1)[-1].strip()  # "A resident could ask: When …?" -> "When …?"
            words = set(content_words(question))
            # about the answer: two of its content words (one for a question of two or three words)
            if len(words) >= 2 and len(words & answer_words) >= min(2, len(words) - 1):
                return question[:1].upper() + question[1:]
    return None


def phrasings_of(text: str, question: str, count: int) -> list[str]:
    """Up to `count` rewordings of `question` from the teacher's lines: questions, distinct, not the original."""
    seen = {" ".join(content_words(question))}
    found = []
    for line in text.splitlines():
        line = _LIST_MARK.sub("", line).strip().strip('"')
        line = re.sub(r"^(?:Q(?:uestion)?\s*\d*\s*[:.]\s*)", "", line, flags=re.I).strip()
        line = line.rsplit(":", 1)[-1].strip()  # "A resident could ask: When …?" -> "When …?"
        key = " ".join(content_words(line))
        if line.endswith("?") and len(content_words(line)) >= 2 and key not in seen:
            seen.add(key)
            found.append(line)
        if len(found) == count:
            break
    return found


def _settings(corpus: Path, teacher: str, per_chunk: int, max_chunks: int, threshold: float, phrasings: int,
              seed: int, judge: str | None = None, min_judge_score: int = 0) -> dict:
    return {"corpus": str(Path(corpus).resolve()), "teacher": teacher, "per_chunk": per_chunk,
            "max_chunks": max_chunks, "threshold": threshold, "phrasings": phrasings, "seed": seed,
            "judge": judge, "min_judge_score": min_judge_score if judge else 0}


def _resume(progress: Path, settings: dict) -> dict[str, dict]:
    """Chunks finished by an earlier run with the same settings (chunk id -> its kept and rejected pairs)."""
    if not progress.is_file():
        return {}
    done, first = {}, True
    for line in progress.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the interruption: everything before it stands
        if first:
            if record.get("settings") != settings:
                return {}  # other settings: start over
            first = False
        elif "chunk_id" in record:
            done[record["chunk_id"]] = record
    return done


def synthesize(corpus: Path | str, teacher, *, per_chunk: int = 3, max_chunks: int = 0, threshold: float = 0.75,
               phrasings: int = 2, max_new_tokens: int = 200, batch_size: int = 16, seed: int = 0,
               mode: str = "answer-first", progress: Path | None = None,
               on_chunk: Callable[[int], None] | None = None, judge=None, min_judge_score: int = 3) -> SynthReport:
    """Pairs for `max_chunks` chunks spread over the documents (0: all), grounded in their chunk, each kept
    question also asked `phrasings` other ways; `teacher`: an EngineTeacher or EndpointTeacher. With `progress`,
    each finished chunk is appended there and a rerun with the same settings resumes after it.

    mode "answer-first": the chunk's fact sentences are the answers, word for word, and the teacher writes the
    question each one answers (a small teacher writes questions far more reliably than faithful answers; the
    answer is grounded by construction). "free": the teacher writes questions and answers, and the grounding filter
    keeps the faithful ones. With `judge`, grounded pairs also need a judge score of at least `min_judge_score`
    before their phrasings are asked for."""
    if mode not in MODES:
        raise TailorError(f"--mode must be one of {', '.join(MODES)} (found {mode!r})")
    if not 0 < threshold <= 1:
        raise TailorError(f"--threshold must be above 0 and at most 1 (found {threshold})")
    if judge is not None and not 1 <= min_judge_score <= 5:
        raise TailorError(f"--min-judge-score must be 1 to 5 (found {min_judge_score})")
    if not Path(corpus).is_file():
        raise TailorError(f"{corpus}: corpus not found; run `tailor ingest` first")
    chunks = [record for _, record in read_jsonl(corpus) if "messages" not in record and record.get("text")]
    if not chunks:
        raise TailorError(f"{corpus}: no text chunks to write questions about")
    started = time.perf_counter()
    picked = spread(chunks, max_chunks, seed)
    report = SynthReport(chunks=len(picked), threshold=threshold, teacher=teacher.name,
                         documents=len({str(c.get("source", "")) for c in chunks}))
    settings = {**_settings(Path(corpus), teacher.name, per_chunk, max_chunks, threshold, phrasings, seed,
                            getattr(judge, "name", None), min_judge_score), "mode": mode}
    done = _resume(progress, settings) if progress else {}
    if progress is not None and not done:
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
    seen_questions: set[str] = set()

    def take(kept: list[dict], rejected: list[dict]) -> None:
        for pair in kept:
            key = " ".join(content_words(pair["question"]))
            if key in seen_questions:
                report.rejected.append({**pair, "reason": "duplicate question"})
                continue
            seen_questions.add(key)
            report.kept.append(pair)
            report.phrasings += "phrasing_of" in pair
            report.covered_chunks.add(pair.get("chunk_id"))
            report.covered_documents.add(str(pair.get("source", "")))
        report.rejected.extend(rejected)

    todo = []
    for chunk in picked:
        if chunk.get("id") in done:
            record = done[chunk["id"]]
            report.generated += record["generated"]
            take(record["kept"], record["rejected"])
            report.resumed_chunks += 1
        else:
            todo.append(chunk)
    if on_chunk is not None and report.resumed_chunks:
        on_chunk(report.resumed_chunks)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        results = _answer_first(teacher, batch, per_chunk, threshold) if mode == "answer-first" else \
            _free(teacher, batch, per_chunk, threshold, max_new_tokens)
        if judge is not None:
            _judged(judge, results, min_judge_score, batch_size)
        if phrasings:
            asks = [(i, pair) for i, (_, judged) in enumerate(results) for pair in judged.kept]
            texts = teacher.complete([[{"role": "user", "content": PHRASE.format(question=pair["question"],
                                                                                 count=phrasings)}]
                                      for _, pair in asks], max_new_tokens=24 * phrasings) if asks else []
            for (i, pair), text in zip(asks, texts, strict=True):
                results[i][1].kept += [{**pair, "question": question, "phrasing_of": pair["question"]}
                                       for question in phrasings_of(text, pair["question"], phrasings)]
        for chunk, judged in results:
            report.generated += judged.generated
            take(judged.kept, judged.rejected)
            if progress is not None:
                with open(progress, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"chunk_id": chunk.get("id"), "generated": judged.generated,
                                             "kept": judged.kept, "rejected": judged.rejected}) + "\n")
        if on_chunk is not None:
            on_chunk(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def _judged(judge, results: list, min_score: int, batch_size: int) -> None:
    """Move each grounded pair the judge scores below `min_score` (or whose reply has no score) to the rejected."""
    from tailor.evaluate.judge import support_scores

    asks = [(judged, pair, chunk) for chunk, judged in results for pair in judged.kept]
    if not asks:
        return
    rows = support_scores(judge, [{"passage": chunk["text"], "question": pair["question"], "answer": pair["answer"]}
                                  for _, pair, chunk in asks], batch_size=batch_size)
    for judged, _, _ in asks:
        judged.kept = []
    for (judged, pair, _), row in zip(asks, rows, strict=True):
        pair = {**pair, "judge_score": row["score"], **({"judge_expected_score": row["expected_score"]}
                                                        if "expected_score" in row else {})}
        if row["score"] is None:
            judged.rejected.append({**pair, "reason": "judge reply without a score"})
        elif row["score"] < min_score:
            judged.rejected.append({**pair, "reason": f"judge score {row['score']} < {min_score}"})
        else:
            judged.kept.append(pair)


def _free(teacher, batch: list[dict], per_chunk: int, threshold: float, max_new_tokens: int) -> list:
    outputs = teacher.complete([[{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": INSTRUCTION.format(passage=c["text"], count=per_chunk)}]
                                for c in batch], max_new_tokens)
    results = []
    for chunk, output in zip(batch, outputs, strict=True):
        judged = SynthReport(threshold=threshold)
        judge_pairs(parse_pairs(output)[:per_chunk], chunk, threshold, judged)
        results.append((chunk, judged))
    return results


def _answer_first(teacher, batch: list[dict], per_chunk: int, threshold: float) -> list:
    asks = [(chunk, answer) for chunk in batch for answer in fact_sentences(chunk["text"], per_chunk)]
    replies = teacher.complete([[{"role": "user", "content": QUESTION_FOR.format(answer=answer)}]
                                for _, answer in asks], 48) if asks else []
    judged = {chunk.get("id"): SynthReport(threshold=threshold) for chunk in batch}
    for (chunk, answer), reply in zip(asks, replies, strict=True):
        question = question_of(reply, answer)
        if question is None:
            judged[chunk.get("id")].generated += 1
            judged[chunk.get("id")].rejected.append({
                "question": reply.strip()[:200], "answer": answer, "chunk_id": chunk.get("id"),
                "source": chunk.get("source"), "page": chunk.get("page"),
                "reason": "no question about the answer in the reply"})
            continue
        judge_pairs([(question, answer)], chunk, threshold, judged[chunk.get("id")])
    return [(chunk, judged[chunk.get("id")]) for chunk in batch]
