"""Retrieval over the corpus: the index (`tailor index`), hybrid search, and grounded prompts with citations.

    RUN/corpus.jsonl ──index──▶ RUN/index/ (chunks.jsonl, bm25/, dense.faiss or a Chroma collection, index.json)
    question ──search──▶ passages (BM25 + dense, fused by reciprocal rank, optionally reranked) ──▶ prompt, sources
"""
