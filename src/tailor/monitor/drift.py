"""The drift report: what users ask that the documents (or the model) do not cover. From the feedback store, the
questions whose answer abstained or got a thumbs down, grouped by meaning (the retrieval index's sentence embedding,
all-MiniLM-L6-v2 by default; agglomerative clustering on cosine distance, so the number of topics is found, not
given), biggest group first, each with its most typical questions as examples.

A question is "unanswered" when its answer is an abstention (`retrieval.abstain_answer`, or a sentence such as "the
documents do not say", grounding.is_abstention) or any feedback on it was a thumbs down."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tailor.retrieval.grounding import is_abstention
from tailor.retrieval.index import words


@dataclass
class Topic:
    """One cluster of unanswered questions."""

    label: str  # its most frequent content words
    size: int
    abstained: int
    thumbs_down: int
    models: list[str]
    examples: list[str]  # the questions nearest the cluster's centre, most typical first
    first_seen: str
    last_seen: str
    ids: list[str] = field(default_factory=list)  # completion ids, to look the conversations up

    def as_json(self) -> dict:
        return dict(vars(self))


def unanswered(answers: list[dict], abstain_answer: str) -> list[dict]:
    kept = []
    for answer in answers:
        abstained = is_abstention(answer["answer"], abstain_answer)
        if (abstained or answer["thumbs_down"]) and answer["question"].strip():
            kept.append({**answer, "abstained": abstained})
    return kept


def cluster(vectors: np.ndarray, max_distance: float) -> np.ndarray:
    """A cluster number per row of unit vectors: average-linkage groups whose mean cosine distance stays under
    `max_distance`."""
    if len(vectors) < 2:
        return np.zeros(len(vectors), dtype=int)
    from sklearn.cluster import AgglomerativeClustering

    return AgglomerativeClustering(n_clusters=None, distance_threshold=max_distance, metric="cosine",
                                   linkage="average").fit_predict(vectors)


def topics(questions: list[dict], vectors: np.ndarray, max_distance: float = 0.6, examples: int = 3) -> list[Topic]:
    """`questions` (from `unanswered`) grouped by their embeddings `vectors` ([questions, dim], unit rows)."""
    labels = cluster(vectors, max_distance)
    found = []
    for number in sorted(set(labels.tolist())):
        members = [i for i, label in enumerate(labels) if label == number]
        centre = vectors[members].mean(axis=0)
        typical = sorted(members, key=lambda i: -float(vectors[i] @ centre))
        texts, seen = [], set()
        for i in typical:  # the same question asked twice is one example
            text = questions[i]["question"].strip()
            if text.lower() not in seen:
                seen.add(text.lower())
                texts.append(text)
        common = Counter(word for i in members for word in set(words(questions[i]["question"])) if len(word) > 2)
        times = sorted(questions[i]["created_at"] for i in members)
        found.append(Topic(label=" ".join(word for word, _ in common.most_common(3)) or texts[0][:40],
                           size=len(members), abstained=sum(questions[i]["abstained"] for i in members),
                           thumbs_down=sum(questions[i]["thumbs_down"] for i in members),
                           models=sorted({questions[i]["model"] for i in members}), examples=texts[:examples],
                           first_seen=times[0], last_seen=times[-1], ids=[questions[i]["id"] for i in typical]))
    return sorted(found, key=lambda topic: (-topic.size, topic.label))


def drift_report(answers: list[dict], abstain_answer: str, embedding_model: str | None = None,
                 max_distance: float = 0.6, examples: int = 3) -> list[Topic]:
    """The topics of the unanswered questions among `answers` (feedback.read_answers)."""
    questions = unanswered(answers, abstain_answer)
    if not questions:
        return []
    from tailor.methods.prompt import default_embedding_model, embed

    vectors = embed(embedding_model or default_embedding_model(), [q["question"] for q in questions]).numpy()
    return topics(questions, vectors, max_distance, examples)
