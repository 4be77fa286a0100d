"""Hybrid search over an index: BM25 and dense rankings fused by reciprocal rank (Cormack et al., 2009), an optional
cross-encoder rerank, then passages cut around the sentences that match the question and packed into the prompt's
token budget. Fusion and cutting are a few lines of arithmetic on the libraries' rankings, written here because no
well-kept library does exactly this over bm25s and faiss/Chroma results.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tailor.config import RetrievalConfig
from tailor.errors import TailorError
from tailor.retrieval.index import Index, words

RANKING_DEPTH = 10  # hits kept per question for recall@k and MRR
_SENTENCE_BREAK = re.compile(r"(?<=[.!?:])\s+(?=[A-Z0-9\"'(\[])|\n+")


@dataclass
class Passage:
    """One retrieved chunk as the prompt shows it (`text`, cut around the match) with its provenance."""

    id: str
    text: str
    source: str
    title: str | None
    page: int | None
    line: int | None
    url: str | None
    rank: int  # 1-based, after fusion and rerank
    score: float  # the fused (or reranked) score

    def citation(self, snippet_chars: int = 280, support: float | None = None) -> dict:
        snippet = self.text if len(self.text) <= snippet_chars else self.text[:snippet_chars].rsplit(" ", 1)[0] + " …"
        cited: dict[str, Any]
        cited = {"id": self.id, "source": self.source, "title": self.title, "page": self.page, "line": self.line,
                 "url": self.url, "snippet": snippet, "rank": self.rank}
        if support is not None:
            cited["support"] = round(support, 3)
        return cited


@dataclass
class Retrieval:
    """What one question retrieved: the passages for the prompt, the deeper ranking, and whether to abstain."""

    query: str
    passages: list[Passage]
    ranking: list[str] = field(default_factory=list)  # chunk ids, best first (RANKING_DEPTH of them)
    similarity: float = 0.0  # best dense cosine similarity
    coverage: float = 0.0  # IDF-weighted share of the question's words found in the best passage
    abstain: bool = False
    seconds: float = 0.0


@functools.lru_cache(maxsize=2)
def _cross_encoder(folder: str):
    if not Path(folder).is_dir():
        raise TailorError(f"retrieval.rerank_model: {folder} is not a folder (a sentence-transformers CrossEncoder)")
    from sentence_transformers import CrossEncoder

    return CrossEncoder(folder, device="cpu")


def cut_passage(text: str, query_words: set[str], limit: int, weight: Callable[[str], float]) -> str:
    """The stretch of whole sentences of `text`, at most `limit` characters, around the sentence that holds the
    most (IDF-weighted) query words: a 135M reader copies from what is near the question's words."""
    if len(text) <= limit:
        return text
    sentences = [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]
    if not sentences:
        return text[:limit]
    scores = [sum(weight(w) for w in set(words(s)) & query_words) for s in sentences]
    best = int(np.argmax(scores))
    start = end = best
    length = len(sentences[best])
    # grow forward first: an answer usually follows the sentence that names its subject
    while True:
        grown = False
        if end + 1 < len(sentences) and length + 1 + len(sentences[end + 1]) <= limit:
            end += 1
            length += 1 + len(sentences[end])
            grown = True
        if start > 0 and length + 1 + len(sentences[start - 1]) <= limit:
            start -= 1
            length += 1 + len(sentences[start])
            grown = True
        if not grown:
            break
    passage = " ".join(sentences[start:end + 1])
    return passage if len(passage) <= limit else passage[:limit].rsplit(" ", 1)[0]


class Retriever:
    """Searches one index with one `retrieval:` configuration. `count_tokens` measures passages against
    max_context_tokens (the served model's tokenizer); without it, four characters count as a token."""

    def __init__(self, index: Index | Path | str, settings: RetrievalConfig,
                 count_tokens: Callable[[str], int] | None = None):
        self.index = index if isinstance(index, Index) else Index(index)
        self.settings = settings
        self.count_tokens = count_tokens or (lambda text: len(text) // 4 + 1)

    def embed(self, query: str) -> np.ndarray:
        from tailor.methods.prompt import embed

        return embed(self.index.embedding_model, [query])[0].numpy()

    def rank(self, query: str) -> tuple[list[tuple[int, float]], float]:
        """Chunk positions with their fused (or reranked) scores, best first, and the best dense similarity."""
        s, index = self.settings, self.index
        dense = index.dense_search(self.embed(query), s.candidates) if s.fusion != "bm25" or s.min_score else []
        lexical = index.lexical_search(query, s.candidates) if s.fusion != "dense" else []
        similarity = dense[0][1] if dense else 0.0
        if s.fusion == "dense":
            ranked = dense
        elif s.fusion == "bm25":
            ranked = lexical
        else:
            fused: dict[int, float] = {}
            for ranking in (lexical, dense):
                for rank, (position, _) in enumerate(ranking, start=1):
                    fused[position] = fused.get(position, 0.0) + 1.0 / (s.rrf_k + rank)
            ranked = sorted(fused.items(), key=lambda item: -item[1])
        if s.rerank_model and ranked:
            head = ranked[:s.rerank_candidates]
            scores = _cross_encoder(s.rerank_model).predict(
                [(query, index.chunks[position]["text"]) for position, _ in head], show_progress_bar=False)
            head = sorted(zip([p for p, _ in head], map(float, scores), strict=True), key=lambda item: -item[1])
            ranked = head + ranked[s.rerank_candidates:]
        return ranked, similarity

    def passages(self, query: str, chosen: list[tuple[int, float]]) -> list[Passage]:
        """The chunks at `chosen` (position, score), in that order, cut around the query's words and packed into
        max_context_tokens: a passage that does not fit is left out (a later, shorter one may still fit)."""
        index, s = self.index, self.settings
        query_words = set(words(query))
        passages: list[Passage] = []
        budget = s.max_context_tokens
        for position, score in chosen:
            chunk = index.chunks[position]
            text = cut_passage(chunk["text"], query_words, s.passage_chars, index.idf)
            cost = self.count_tokens(text)
            if cost > budget:
                continue
            budget -= cost
            passages.append(Passage(id=chunk["id"], text=text, source=chunk["source"], title=chunk.get("title"),
                                    page=chunk.get("page"), line=chunk.get("line"), url=chunk.get("url"),
                                    rank=len(passages) + 1, score=round(score, 5)))
        return passages

    def retrieve(self, query: str) -> Retrieval:
        started = time.perf_counter()
        s, index = self.settings, self.index
        ranked, similarity = self.rank(query)
        query_words = set(words(query))
        passages = self.passages(query, ranked[:s.k])
        coverage = max((self._coverage(query_words, index.chunk_words[p]) for p, _ in ranked[:s.k]), default=0.0)
        abstain = not passages or (s.min_score is not None and similarity < s.min_score) or (
            s.min_coverage is not None and coverage < s.min_coverage)
        return Retrieval(query=query, passages=passages, ranking=[index.chunks[p]["id"] for p, _ in
                                                                  ranked[:RANKING_DEPTH]],
                         similarity=round(similarity, 4), coverage=round(coverage, 4), abstain=abstain,
                         seconds=time.perf_counter() - started)

    def _coverage(self, query_words: set[str], present: frozenset[str]) -> float:
        if not query_words:
            return 0.0
        total = sum(self.index.idf(w) for w in query_words)
        return sum(self.index.idf(w) for w in query_words & present) / total if total > 0 else 0.0
