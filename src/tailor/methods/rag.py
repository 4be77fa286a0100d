"""Retrieval-augmented generation: the unchanged base model answers with passages retrieved from the corpus in its
prompt (Lewis et al., 2020), and returns their sources.

Nothing trains and no training records are needed. "Training" writes `RUN/rag/retrieval.json`: the `retrieval:`
settings and where the index is (`tailor index` builds it). Evaluation and serving run the base model on grounded
conversations (tailor.retrieval.grounding). Any other method becomes retrieval-aware with `retrieval.enabled`.
"""

from __future__ import annotations

from pathlib import Path

from tailor.methods.registry import Method, MethodOptions, register


class RagOptions(MethodOptions):
    """rag has no options of its own: everything is in the workspace's `retrieval:` section."""


def build(conversations: list[list[dict]], folder: Path, options: RagOptions, workspace_system_prompt: str) -> int:
    """The artifact is the retrieval.json that `build_artifact` writes into every grounded folder."""
    return 0


register(Method(name="rag", options=RagOptions, trains=False, artifact="rag", build=build, needs_data=False,
                summary="The base model with passages retrieved from the corpus (BM25 + dense) in its prompt, "
                        "answers cited; trains nothing."))
