"""Duplicate documents: exact copies by hash, near copies by MinHash + LSH over word 5-grams.

Near duplicates are what exact hashing misses: the same page crawled twice with a different date line, a PDF and
its HTML rendering, a copy with one paragraph edited. Training on them over-weights that text and, across a
train/eval split, leaks answers into the evaluation.

The first document in source order is kept; every later one whose estimated Jaccard similarity (over the sets of
word 5-grams) to a kept document reaches the threshold is removed and listed in that document's cluster. Only kept
documents are indexed, so a chain A ~ B ~ C where C is far from A keeps C: nothing is removed for resembling a
document that is itself gone.

    dedup = Deduplicator(near_threshold=0.8)
    for label, text in documents:
        kept_as = dedup.check(label, text)   # None: keep it; else ("exact" | "near", label of the copy kept)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from tailor.errors import TailorError

SHINGLE_WORDS = 5
NUM_PERM = 128  # 128 permutations: the estimate's standard error is about 0.035 at a Jaccard of 0.8
WORD = re.compile(r"\w+")


@dataclass
class Cluster:
    kept: str
    removed: list[tuple[str, float]] = field(default_factory=list)  # (label, estimated Jaccard similarity)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "removed": [{"label": label, "similarity": round(similarity, 3)}
                                               for label, similarity in self.removed]}


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[str]:
    """Lower-cased word n-grams; a text shorter than n words is one shingle, so it can still match its copy."""
    words = WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def exact_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Deduplicator:
    """Streaming: documents are checked one at a time, in the order that decides which copy is kept."""

    def __init__(self, near_threshold: float | None = 0.8, *, num_perm: int = NUM_PERM, seed: int = 1):
        if near_threshold is not None and not 0 <= near_threshold <= 1:
            raise TailorError(f"near-duplicate threshold must be between 0 and 1 (found {near_threshold})")
        self.near_threshold = near_threshold or None  # 0 or None: exact duplicates only
        self.num_perm, self.seed = num_perm, seed
        self._exact: dict[str, str] = {}  # sha256 -> label kept
        self._minhashes: dict[str, object] = {}  # label kept -> its MinHash
        self.clusters: dict[str, Cluster] = {}  # label kept -> near duplicates removed for it
        self.exact_duplicates: list[tuple[str, str]] = []  # (removed, kept)
        self._lsh = None
        if self.near_threshold:
            from datasketch import MinHashLSH  # late: a second of import time, only when near-dup is on

            self._lsh = MinHashLSH(threshold=self.near_threshold, num_perm=num_perm)

    def check(self, label: str, text: str) -> tuple[str, str] | None:
        """None when `text` is new (it is then remembered), else ("exact" or "near", label of the kept copy)."""
        digest = exact_key(text)
        if digest in self._exact:
            self.exact_duplicates.append((label, self._exact[digest]))
            return "exact", self._exact[digest]
        if self._lsh is not None:
            minhash = self._minhash(text)
            # LSH only proposes candidates; the estimate decides, so the threshold means what it says
            best = max(((other, minhash.jaccard(self._minhashes[other])) for other in self._lsh.query(minhash)),
                       key=lambda pair: pair[1], default=None)
            if best is not None and best[1] >= self.near_threshold:
                self.clusters.setdefault(best[0], Cluster(best[0])).removed.append((label, best[1]))
                return "near", best[0]
            if label in self._minhashes:
                raise TailorError(f"deduplication: the label {label!r} was given twice")
            self._lsh.insert(label, minhash)
            self._minhashes[label] = minhash
        self._exact[digest] = label
        return None

    def _minhash(self, text: str):
        from datasketch import MinHash

        minhash = MinHash(num_perm=self.num_perm, seed=self.seed)
        for shingle in shingles(text):
            minhash.update(shingle.encode("utf-8"))
        return minhash

    def near_clusters(self) -> list[Cluster]:
        return list(self.clusters.values())


def find_duplicates(documents: Iterable[tuple[str, str]], near_threshold: float | None = 0.8
                    ) -> tuple[list[str], list[tuple[str, str]], list[Cluster]]:
    """Labels kept, exact duplicates (removed, kept) and near-duplicate clusters, for (label, text) pairs."""
    dedup = Deduplicator(near_threshold)
    kept = [label for label, text in documents if dedup.check(label, text) is None]
    return kept, dedup.exact_duplicates, dedup.near_clusters()


def find_leaks(train: Iterable[tuple[str, str]], held_out: Iterable[tuple[str, str]], threshold: float = 0.8,
               ngram: int = 3) -> list[tuple[str, str, float]]:
    """(held-out label, train label, similarity) for every held-out text that is a copy or a near copy of a
    training text: Jaccard similarity over lower-cased word `ngram`-grams at least `threshold` (copies: 1.0).

    Examples are short (a question and its answer), so 3-grams rather than the 5-grams used for documents; LSH
    proposes candidates and the exact Jaccard of the n-gram sets decides, so `threshold` means what it says.
    """
    from datasketch import MinHash, MinHashLSH

    if not 0 < threshold <= 1:
        raise TailorError(f"leakage threshold must be above 0 and at most 1 (found {threshold})")

    def minhash(grams: set[str]):
        hashed = MinHash(num_perm=NUM_PERM, seed=1)
        for gram in grams:
            hashed.update(gram.encode("utf-8"))
        return hashed

    exact: dict[str, str] = {}
    grams_of: list[tuple[str, set[str]]] = []
    # a lower LSH threshold than asked: its banding misses some pairs right at the threshold
    lsh = MinHashLSH(threshold=max(0.05, threshold - 0.15), num_perm=NUM_PERM)
    for label, text in train:
        exact.setdefault(exact_key(" ".join(WORD.findall(text.lower()))), label)
        grams = shingles(text, ngram)
        if grams:
            lsh.insert(str(len(grams_of)), minhash(grams))
            grams_of.append((label, grams))
    leaks = []
    for label, text in held_out:
        copy = exact.get(exact_key(" ".join(WORD.findall(text.lower()))))
        if copy is not None:
            leaks.append((label, copy, 1.0))
            continue
        grams = shingles(text, ngram)
        if not grams:
            continue
        scored = [(grams_of[int(key)][0], jaccard(grams, grams_of[int(key)][1])) for key in lsh.query(minhash(grams))]
        best = max(scored, key=lambda pair: pair[1], default=None)
        if best is not None and best[1] >= threshold:
            leaks.append((label, best[0], best[1]))
    return leaks
