"""The dense half of the index on a Chroma server (`retrieval.url`), for corpora that outgrow one machine.

Chroma because the same PyPI package holds the client and the server (`chroma run`), so tests start a real one on
this machine, and it runs distributed in production. tailor computes the embeddings itself (the collection has no
embedding function) so the server ranks exactly the vectors the embedded index would; its HNSW graph is an
approximate search, exact in practice at the sizes tested here.
"""

from __future__ import annotations

from urllib.parse import urlparse

import numpy as np

from tailor.errors import TailorError

UPSERT_BATCH = 1000


def _client(url: str):
    try:
        import chromadb
    except ImportError:
        raise TailorError("retrieval.url: the Chroma client is not installed (pip install chromadb-client)") from None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TailorError(f"retrieval.url: '{url}' is not an http(s)://host:port address of a Chroma server")
    try:
        client = chromadb.HttpClient(host=parsed.hostname, port=parsed.port or (443 if parsed.scheme == "https"
                                                                                else 8000),
                                     ssl=parsed.scheme == "https")
        client.heartbeat()
    except Exception as exc:  # the client raises several kinds (connection, HTTP, value) for an unreachable server
        raise TailorError(f"retrieval.url: cannot reach the Chroma server at {url} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else 'no answer'})") from None
    return client


class ChromaStore:
    """One collection of chunk vectors (cosine space), addressed by corpus chunk id."""

    def __init__(self, url: str, name: str, *, create: bool = True):
        self.url, self.name = url, name
        client = _client(url)
        try:
            if create:
                self.collection = client.get_or_create_collection(name, embedding_function=None,
                                                                  configuration={"hnsw": {"space": "cosine"}})
            else:
                self.collection = client.get_collection(name, embedding_function=None)
        except Exception as exc:
            raise TailorError(f"retrieval.url: {url} has no usable collection '{name}' ({exc}); run `tailor index`"
                              ) from None

    def sync(self, ids: list[str], vectors: np.ndarray, sources: list[str], changed: list[str]) -> None:
        """Make the collection hold exactly `ids`: upsert the changed and missing ones, delete the rest."""
        present = set(self.collection.get(include=[])["ids"])
        wanted = set(ids)
        stale = sorted(present - wanted)
        for start in range(0, len(stale), UPSERT_BATCH):
            self.collection.delete(ids=stale[start:start + UPSERT_BATCH])
        todo = set(changed) | (wanted - present)
        rows = [i for i, cid in enumerate(ids) if cid in todo]
        for start in range(0, len(rows), UPSERT_BATCH):
            batch = rows[start:start + UPSERT_BATCH]
            self.collection.upsert(ids=[ids[i] for i in batch], embeddings=vectors[batch],
                                   metadatas=[{"source": sources[i]} for i in batch])

    def search(self, vector: np.ndarray, n: int) -> list[tuple[str, float]]:
        try:
            found = self.collection.query(query_embeddings=[np.asarray(vector, dtype=np.float32)], n_results=n,
                                          include=["distances"])
        except Exception as exc:
            raise TailorError(f"retrieval.url: the Chroma server at {self.url} failed a query ({exc})") from None
        # cosine space: distance = 1 - cosine similarity
        return [(cid, 1.0 - float(d)) for cid, d in zip(found["ids"][0], found["distances"][0], strict=True)]
