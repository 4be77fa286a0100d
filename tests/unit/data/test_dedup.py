"""Exact and near-duplicate removal: the library on its own, then wired into ingest on the city example."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tailor.data.dedup import Deduplicator, find_duplicates, jaccard, shingles
from tailor.data.ingest import ingest
from tailor.errors import TailorError

CITY_DOCS = Path(__file__).resolve().parents[3] / "examples" / "city-services" / "docs"


def words(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(2000)]
    return [rng.choice(vocabulary) for _ in range(count)]


def edited(tokens: list[str], changes: int, seed: int) -> list[str]:
    """A copy with `changes` words replaced at spread-out positions."""
    rng = random.Random(seed)
    copy = list(tokens)
    for position in rng.sample(range(len(copy)), changes):
        copy[position] = f"edit{position}"
    return copy


def test_shingles_are_word_five_grams():
    assert shingles("The pool opens in June every year.") == {"the pool opens in june", "pool opens in june every",
                                                              "opens in june every year"}
    assert shingles("Short note") == {"short note"}  # fewer than five words: one shingle, so copies still match
    assert shingles("") == set()
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_near_duplicates_are_clustered_and_the_first_copy_is_kept():
    base = words(400, seed=1)
    close = edited(base, 4, seed=2)  # 4 words of 400: Jaccard about 0.9
    far = edited(base, 60, seed=3)  # 60 words: Jaccard well under 0.5
    other = words(400, seed=4)
    documents = [("a.txt", " ".join(base)), ("b.txt", " ".join(other)), ("c.txt", " ".join(close)),
                 ("d.txt", " ".join(far)), ("e.txt", " ".join(base))]
    true_similarity = jaccard(shingles(documents[0][1]), shingles(documents[2][1]))
    assert 0.85 < true_similarity < 0.97
    kept, exact, clusters = find_duplicates(documents, near_threshold=0.8)
    assert kept == ["a.txt", "b.txt", "d.txt"]
    assert exact == [("e.txt", "a.txt")]  # the exact copy is reported as exact, not near
    [cluster] = clusters
    assert cluster.kept == "a.txt" and [label for label, _ in cluster.removed] == ["c.txt"]
    assert cluster.removed[0][1] == pytest.approx(true_similarity, abs=0.1)  # MinHash estimates the Jaccard
    assert cluster.to_dict()["removed"][0]["label"] == "c.txt"


def test_threshold_decides_and_zero_disables():
    base = words(300, seed=5)
    half = edited(base, 30, seed=6)  # Jaccard about 0.55
    documents = [("a", " ".join(base)), ("b", " ".join(half))]
    assert find_duplicates(documents, near_threshold=0.9)[0] == ["a", "b"]
    assert find_duplicates(documents, near_threshold=0.3)[0] == ["a"]
    assert find_duplicates(documents, near_threshold=0)[0] == ["a", "b"]
    assert find_duplicates(documents, near_threshold=None)[0] == ["a", "b"]
    with pytest.raises(TailorError, match="between 0 and 1"):
        Deduplicator(1.5)


def test_only_kept_documents_attract_duplicates():
    """A ~ B and B ~ C with C far from A: B goes for resembling A, and C stays (its neighbour B is gone)."""
    a = words(300, seed=8)
    b = edited(a, 3, seed=9)
    c = edited(b, 3, seed=10)
    assert jaccard(shingles(" ".join(a)), shingles(" ".join(b))) > 0.88
    assert jaccard(shingles(" ".join(a)), shingles(" ".join(c))) < 0.85
    dedup = Deduplicator(0.85)
    assert dedup.check("a", " ".join(a)) is None
    assert dedup.check("b", " ".join(b)) == ("near", "a")
    result = dedup.check("c", " ".join(c))
    assert result in (None, ("near", "a"))  # never ("near", "b"): b was removed
    assert all(cluster.kept == "a" for cluster in dedup.near_clusters())


def test_ingest_drops_a_near_copy_of_a_city_document(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("library-hours.txt", "noise-complaints.txt", "tree-planting.txt", "library-hours-copy.txt"):
        shutil.copy(CITY_DOCS / name, docs / name)
    original = (CITY_DOCS / "parks-and-pool.md").read_text(encoding="utf-8")
    (docs / "a-parks.md").write_text(original, encoding="utf-8")
    # the same page re-published with one sentence changed: exact hashing cannot see it
    first_sentence = original.split(". ")[1]
    (docs / "b-parks-updated.md").write_text(original.replace(first_sentence, "Updated for the new season"),
                                             encoding="utf-8")
    summary = ingest(["docs"], tmp_path / "corpus.jsonl", progress=False)
    sources = {json.loads(line)["source"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()}
    assert "docs/b-parks-updated.md" not in sources and "docs/a-parks.md" in sources
    [cluster] = summary.near_duplicates
    assert cluster.kept == "docs/a-parks.md" and cluster.removed[0][0] == "docs/b-parks-updated.md"
    assert cluster.removed[0][1] >= 0.85
    # the city's own exact copy is still caught by the exact pass, with the first file kept
    assert summary.duplicates == [("docs/library-hours.txt", "docs/library-hours-copy.txt")]
    report = summary.to_dict()
    assert report["near_duplicates"][0]["removed"][0]["label"] == "docs/b-parks-updated.md"

    off = ingest(["docs"], tmp_path / "all.jsonl", near_dup_threshold=None, progress=False)
    assert off.near_duplicates == [] and off.documents == summary.documents + 1


def test_city_documents_have_no_near_duplicates_besides_the_exact_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(CITY_DOCS.parent)
    summary = ingest(["docs"], tmp_path / "corpus.jsonl", progress=False)
    assert summary.near_duplicates == []
    assert summary.duplicates == [("docs/library-hours.txt", "docs/library-hours-copy.txt")]
