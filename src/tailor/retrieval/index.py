"""The retrieval index of a corpus: `tailor index` turns RUN/corpus.jsonl into RUN/index/.

    index.json        what was indexed: the embedding model, dimensions, documents (source -> doc_sha256), server
    chunks.jsonl      the indexed chunks with their provenance (source, title, page, line, url)
    embeddings.npy    [chunks, dim] float32, unit rows, in chunks.jsonl order (kept to re-index incrementally)
    dense.faiss       faiss IndexFlatIP over the embeddings (exact cosine search), when no server is configured
    bm25/             the lexical half: a bm25s index over the same chunks

Libraries do the searching: bm25s for BM25 (sparse matrices), faiss for vectors, Chroma for a server that holds the
vectors of a corpus one machine cannot (`retrieval.url`). Re-indexing embeds only the chunks of added or changed
documents (by doc_sha256); removed documents leave the index, and the server collection follows. The folder is
written beside the old one and swapped in at the end, so a failure never leaves half an index.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tailor.errors import TailorError
from tailor.workspace import atomic_dir, now_iso, read_json, read_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    from tailor.retrieval.server import ChromaStore

INDEX_FILE = "index.json"
CHUNKS_FILE = "chunks.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
DENSE_FILE = "dense.faiss"
BM25_DIR = "bm25"
_PART = re.compile(r"\w+")
PROVENANCE = ("source", "title", "page", "line", "chunk", "char_start", "char_end", "doc_sha256", "sha256")
_WORD = re.compile(r"\w+(?:[.\-/:@]\w+)*")  # keeps 127.0.0.1, 0.9.5, listen-address, /etc/rc.conf whole


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


@functools.cache
def _stemmer():
    import Stemmer  # PyStemmer: Snowball's English stemmer, what bm25s itself uses

    return Stemmer.Stemmer("english")


def words(text: str) -> list[str]:
    """Lowercased, stemmed word tokens without English stopwords: what BM25 indexes and coverage counts
    ("listens" and "listen" are one word)."""
    stop = _stopwords()
    tokens = []
    for token in _WORD.findall(text.lower()):
        tokens.append(token)
        if not token.isalnum():  # a compound also counts as its parts: "listen-address" matches "listen address"
            tokens += _PART.findall(token)
    return _stemmer().stemWords([w for w in tokens if w not in stop])


@dataclass
class IndexSummary:
    documents: int = 0
    chunks: int = 0
    embedded: int = 0  # chunks embedded by this run
    reused: int = 0  # chunks whose embeddings came from the previous index
    added: list[str] = field(default_factory=list)  # documents new to the index
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_corpus(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TailorError(f"{path}: no corpus; run `tailor ingest` first")
    chunks = []
    for line_no, record in read_jsonl(path):
        if not isinstance(record.get("text"), str) or not isinstance(record.get("id"), str):
            raise TailorError(f"{path}:{line_no}: a corpus record needs \"id\" and \"text\" strings (written by "
                              f"`tailor ingest`)")
        if record["text"].strip():
            chunks.append(record)
    if not chunks:
        raise TailorError(f"{path}: the corpus is empty; nothing to index (check `tailor ingest`'s summary)")
    return chunks


def _chunk_record(record: dict) -> dict:
    source = str(record.get("source") or "")  # a corpus written by another tool may name no source
    kept = {"id": record["id"], "text": record["text"], **{k: record.get(k) for k in PROVENANCE}, "source": source}
    kept["url"] = record.get("url") or (source if source.startswith(("http://", "https://")) else None)
    return kept


def indexed_text(chunk: dict) -> str:
    """What BM25 and the embedding see of a chunk: its document's title first, so a chunk deep in a page still
    matches questions that name the page's subject (contextual chunk headers)."""
    title = (chunk.get("title") or "").strip()
    return f"{title}\n{chunk['text']}" if title and not chunk["text"].startswith(title) else chunk["text"]


def _embed_with_progress(model_folder: str, texts: list[str], show_progress: bool) -> np.ndarray:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tailor.methods.prompt import embed

    vectors = []
    batch = 64
    with Progress(TextColumn("[bold]embedding chunks"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), disable=not show_progress, transient=True) as progress:
        task = progress.add_task("embed", total=len(texts))
        for start in range(0, len(texts), batch):
            vectors.append(embed(model_folder, texts[start:start + batch]).numpy())
            progress.advance(task, len(texts[start:start + batch]))
    return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def build_index(corpus: Path, folder: Path, *, embedding_model: str | None = None, url: str | None = None,
                collection: str | None = None, show_progress: bool = True) -> IndexSummary:
    """Index `corpus` into `folder`, reusing the embeddings of unchanged documents from the index already there."""
    import bm25s

    from tailor.methods.prompt import default_embedding_model

    started = time.perf_counter()
    folder = Path(folder)
    chunks = [_chunk_record(record) for record in read_corpus(corpus)]
    model_folder = embedding_model or default_embedding_model()
    old_chunks, old_vectors, old_docs = _previous(folder, model_folder)
    new_docs = {c["source"]: c.get("doc_sha256") for c in chunks}
    summary = IndexSummary(documents=len(new_docs), chunks=len(chunks))
    summary.added = sorted(s for s in new_docs if s not in old_docs)
    summary.changed = sorted(s for s in new_docs if s in old_docs and old_docs[s] != new_docs[s])
    summary.removed = sorted(s for s in old_docs if s not in new_docs)
    # a chunk keeps its old embedding only when its document is unchanged and the chunk itself is the same
    reuse = {c["id"]: i for i, c in enumerate(old_chunks)
             if old_docs.get(c["source"]) == new_docs.get(c["source"]) and c["source"] not in summary.changed}
    reusable = [c["id"] in reuse and old_chunks[reuse[c["id"]]]["sha256"] == c["sha256"] for c in chunks]
    to_embed = [indexed_text(c) for c, keep in zip(chunks, reusable, strict=True) if not keep]
    fresh = _embed_with_progress(model_folder, to_embed, show_progress) if to_embed else None
    rows, position = [], 0
    for chunk, keep in zip(chunks, reusable, strict=True):
        if keep:
            assert old_vectors is not None  # a chunk is kept only from a previous index
            rows.append(old_vectors[reuse[chunk["id"]]])
        else:
            assert fresh is not None  # embedded above: this chunk was in to_embed
            rows.append(fresh[position])
            position += 1
    vectors = np.stack(rows).astype(np.float32)  # [chunks, dim], unit rows
    summary.embedded, summary.reused = len(to_embed), len(chunks) - len(to_embed)
    with atomic_dir(folder) as tmp:
        write_jsonl(tmp / CHUNKS_FILE, chunks)
        np.save(tmp / EMBEDDINGS_FILE, vectors)
        lexical = bm25s.BM25()
        lexical.index([words(indexed_text(c)) or ["\0"] for c in chunks], show_progress=False)
        lexical.save(str(tmp / BM25_DIR), show_progress=False)
        meta = {"created_at": now_iso(), "corpus": str(Path(corpus).resolve()), "embedding_model": model_folder,
                "dim": int(vectors.shape[1]), "chunks": len(chunks), "documents": new_docs, "server": None}
        if url:
            from tailor.retrieval.server import ChromaStore

            store = ChromaStore(url, collection or "tailor")
            store.sync([c["id"] for c in chunks], vectors, [c["source"] for c in chunks], changed=[
                c["id"] for c, keep in zip(chunks, reusable, strict=True) if not keep])
            meta["server"] = {"url": url, "collection": store.name}
            summary.server = f"{url} ({store.name})"
        else:
            import faiss

            dense = faiss.IndexFlatIP(vectors.shape[1])  # exact inner product = cosine on unit rows
            dense.add(vectors)
            faiss.write_index(dense, str(tmp / DENSE_FILE))
        write_json(tmp / INDEX_FILE, meta)
    summary.seconds = round(time.perf_counter() - started, 2)
    return summary


def _previous(folder: Path, model_folder: str) -> tuple[list[dict], np.ndarray | None, dict]:
    """The chunks, embeddings and documents of the index already in `folder` (nothing when it was embedded with
    another model, or is unreadable: then everything is embedded again)."""
    try:
        meta = read_json(folder / INDEX_FILE)
        if meta.get("embedding_model") != model_folder:
            return [], None, {}
        chunks = [record for _, record in read_jsonl(folder / CHUNKS_FILE)]
        vectors = np.load(folder / EMBEDDINGS_FILE)
        if len(chunks) != vectors.shape[0]:
            return [], None, {}
        return chunks, vectors, dict(meta.get("documents", {}))
    except (OSError, ValueError, TailorError):
        return [], None, {}


class Index:
    """A built index, loaded for searching: the chunks, BM25, and the dense store (faiss here, or the server)."""

    def __init__(self, folder: Path | str):
        import bm25s

        self.folder = Path(folder)
        if not (self.folder / INDEX_FILE).is_file():
            raise TailorError(f"{self.folder}: no retrieval index here; run `tailor index` first")
        self.meta = read_json(self.folder / INDEX_FILE)
        self.chunks = [record for _, record in read_jsonl(self.folder / CHUNKS_FILE)]
        self.position = {c["id"]: i for i, c in enumerate(self.chunks)}
        self.lexical = bm25s.BM25.load(str(self.folder / BM25_DIR), show_progress=False)
        self.vocabulary = self.lexical.vocab_dict
        server = self.meta.get("server")
        if server:
            from tailor.retrieval.server import ChromaStore

            self.dense: FaissStore | ChromaStore = ChromaStore(server["url"], server["collection"], create=False)
        else:
            self.dense = FaissStore(self.folder, [c["id"] for c in self.chunks])
        self.embedding_model = self.meta["embedding_model"]
        self._idf: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    def lexical_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk position, BM25 score) of the best `n` chunks sharing a word with the query, best first."""
        tokens = [w for w in words(query) if w in self.vocabulary]
        if not tokens:
            return []
        found, scores = self.lexical.retrieve([tokens], k=min(n, len(self.chunks)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(found[0], scores[0], strict=True) if s > 0]

    def dense_search(self, vector: np.ndarray, n: int) -> list[tuple[int, float]]:
        """(chunk position, cosine similarity) of the `n` nearest chunks, best first."""
        return [(self.position[cid], score) for cid, score in self.dense.search(vector, min(n, len(self.chunks)))
                if cid in self.position]

    @functools.cached_property
    def chunk_words(self) -> list[frozenset[str]]:
        """Each chunk's word set (`words`), computed once: coverage, gold chunks and IDF read them per question."""
        return [frozenset(words(chunk["text"])) for chunk in self.chunks]

    def idf(self, word: str) -> float:
        """Inverse document frequency over the indexed chunks (rare words weigh more in coverage)."""
        if self._idf is None:
            counts: dict[str, int] = {}
            for chunk_words in self.chunk_words:
                for w in chunk_words:
                    counts[w] = counts.get(w, 0) + 1
            self._idf = counts
        return float(np.log((len(self.chunks) + 1) / (self._idf.get(word, 0) + 0.5)))


class FaissStore:
    """The embedded dense store: an exact inner-product faiss index in the index folder."""

    def __init__(self, folder: Path, ids: list[str]):
        import faiss

        self.index = faiss.read_index(str(Path(folder) / DENSE_FILE))
        self.ids = ids

    def search(self, vector: np.ndarray, n: int) -> list[tuple[str, float]]:
        scores, found = self.index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), n)
        return [(self.ids[i], float(s)) for i, s in zip(found[0], scores[0], strict=True) if i >= 0]
