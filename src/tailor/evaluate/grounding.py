"""Answering and scoring with retrieval: per held-out question, what a grounded model retrieved (recall@k and MRR
against the chunks holding the answer, or the question's `source` document), whether its answer stays within the
passages (faithfulness), whether it cites the right document, and whether it abstains on questions the documents
do not answer. Every model, grounded or not, also gets `fact_recall` (the share of the reference's content words
its answer holds: "port 8118" is credited even when token F1 punishes the sentence around it) and abstention
figures when the eval set has unanswerable questions.
"""

from __future__ import annotations

from typing import Any

from tailor.evaluate.metrics import token_f1
from tailor.retrieval.grounding import Gold, faithfulness, gold_chunks, is_abstention, support
from tailor.retrieval.search import Retrieval
from tailor.sentences import first_sentences

RECALL_AT = (1, 3, 5, 10)


def answer_all(model, conversations: list[list[dict]], *, max_new_tokens: int, batch_size: int,
               sentences: int | None, on_batch=None) -> tuple[list[str], list[list[dict]], list[Retrieval | None]]:
    """Every model's answers, cut after `sentences` sentences. A grounded model (`model.grounding`) first retrieves
    for each question: it answers from the passages, or abstains without generating when retrieval found nothing
    relevant. Returns the answers, the conversations as the model saw them, and the retrievals."""
    grounding = model.grounding
    retrievals: list[Retrieval | None] = [None] * len(conversations)
    seen = list(conversations)
    if grounding is not None:
        retrievals = [grounding.retrieve(conversation) for conversation in conversations]
        seen = [grounding.ground(c, r) for c, r in zip(conversations, retrievals, strict=True)]
    asked = [i for i, r in enumerate(retrievals) if r is None or not r.abstain]
    answers = [grounding.settings.abstain_answer if grounding is not None else ""] * len(conversations)
    if on_batch is not None and len(asked) < len(conversations):
        on_batch(len(conversations) - len(asked))
    generated = model.answers([seen[i] for i in asked], max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_batch=on_batch) if asked else []
    for i, answer in zip(asked, generated, strict=True):
        answers[i] = first_sentences(answer, sentences)
    return answers, seen, retrievals


def fact_recall(answer: str, reference: str) -> float:
    """Share of the reference's content words (stemmed, no stopwords) found in the answer."""
    return support(reference, answer) if reference.strip() else 0.0


def grounding_fields(answer: str, reference: str, meta: dict, retrieval: Retrieval | None, grounding,
                     abstain_answer: str, gold_cache: dict) -> dict:
    """The per-question grounding columns of predictions.jsonl."""
    answerable = meta.get("answerable", True) is not False
    row: dict[str, Any]
    row = {"answerable": answerable, "fact_recall": round(fact_recall(answer, reference), 4) if answerable else None,
           "abstained": is_abstention(answer, abstain_answer)}
    if retrieval is None:
        return row
    row["retrieved"] = [p.citation(snippet_chars=400) for p in retrieval.passages]
    row["ranking"] = retrieval.ranking
    row["citations"] = grounding.cite(answer, retrieval)
    row["retrieval_ms"] = round(retrieval.seconds * 1000, 2)
    row["similarity"], row["coverage"] = retrieval.similarity, retrieval.coverage
    if not answerable:
        return row
    key = (reference, meta.get("gold_source"))
    if key not in gold_cache:
        gold_cache[key] = gold_chunks(grounding.retriever, reference, meta.get("gold_source"))
    gold: Gold = gold_cache[key]
    row["gold_sources"] = sorted(gold.sources)
    if gold.chunks:
        ranks = [i for i, chunk_id in enumerate(retrieval.ranking, start=1) if chunk_id in gold.chunks]
        row["gold_rank"] = ranks[0] if ranks else None
        index = grounding.retriever.index
        documents = [i for i, chunk_id in enumerate(retrieval.ranking, start=1)
                     if index.chunks[index.position[chunk_id]]["source"] in gold.sources]
        row["gold_document_rank"] = documents[0] if documents else None  # any chunk of the right document
    if not row["abstained"]:
        row["faithfulness"] = round(faithfulness(answer, retrieval), 4)
    first = row["citations"][0]["source"] if row["citations"] else None
    row["citation_correct"] = first is not None and first in gold.sources
    return row


def _mean(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def grounding_metrics(rows: list[dict]) -> dict:
    """The model's grounding figures from its rows (only the keys that apply: no retrieval, no recall)."""
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    metrics = {"fact_recall": _mean([r["fact_recall"] for r in answerable]),
               "answerable_token_f1": _mean([token_f1(r["prediction"], r["reference"]) for r in answerable])}
    if unanswerable:
        metrics["abstention_accuracy"] = _mean([r["abstained"] for r in unanswerable])
        metrics["false_abstention"] = _mean([r["abstained"] for r in answerable])
    grounded = [r for r in answerable if "retrieved" in r]
    if not grounded:
        return metrics
    with_gold = [r for r in grounded if "gold_rank" in r]
    for k in RECALL_AT:
        metrics[f"recall_at_{k}"] = _mean([r["gold_rank"] is not None and r["gold_rank"] <= k for r in with_gold])
    metrics["mrr"] = _mean([1.0 / r["gold_rank"] if r["gold_rank"] else 0.0 for r in with_gold])
    metrics["document_recall_at_5"] = _mean([r["gold_document_rank"] is not None and r["gold_document_rank"] <= 5
                                             for r in with_gold])
    metrics["faithfulness"] = _mean([r.get("faithfulness") for r in grounded])
    metrics["citation_accuracy"] = _mean([r["citation_correct"] for r in grounded])
    metrics["retrieval_ms"] = _mean([r["retrieval_ms"] for r in rows if "retrieval_ms" in r])
    metrics["gold_known"] = len(with_gold)
    return metrics


GROUNDING_ROWS = (("fact recall", "fact_recall"), ("recall@5", "recall_at_5"), ("MRR", "mrr"),
                  ("faithfulness", "faithfulness"), ("citation accuracy", "citation_accuracy"),
                  ("abstention accuracy", "abstention_accuracy"), ("false abstention", "false_abstention"))
