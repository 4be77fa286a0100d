"""Documents: what changed in the workspace's documents since the production version's corpus was ingested, and,
for a grounded production model, the candidate's index over the documents as they are now.

The documents (`sources` in tailor.yaml) are read again with the workspace's `ingest:` settings into the cycle's
`documents/corpus.jsonl` and compared with production's `corpus.jsonl` document by document (`doc_sha256`). When
production answers from retrieved passages (its artifact folder holds retrieval.json) and something changed, its
index is copied into the cycle and updated in place: only added or changed documents are embedded again
(retrieval/index.py), and production keeps answering from its own index until the candidate is promoted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tailor.config import TailorConfig
from tailor.data.ingest import ingest
from tailor.errors import TailorError
from tailor.methods.artifacts import artifact_dir, run_method
from tailor.registry.tables import ModelVersion
from tailor.retrieval.grounding import RETRIEVAL_FILE
from tailor.workspace import read_json, read_jsonl

CORPUS = "corpus.jsonl"


def workspace_name(source: str, root: Path) -> str:
    """A record's source as a path inside the workspace, however the ingest that wrote it was started: ingest names
    files relative to its working folder (`docs/a.md`, `ws/docs/a.md`) or absolute. A URL stays as it is."""
    path = Path(source)
    if path.is_absolute():
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else source
    for start in range(len(path.parts)):  # the longest tail that names a file in the workspace
        tail = Path(*path.parts[start:])
        if (root / tail).is_file():
            return tail.as_posix()
    return source


def document_hashes(corpus: Path, root: Path) -> dict[str, str | None]:
    """source (inside the workspace) → its document's sha256, over a corpus file's records."""
    return {workspace_name(record["source"], root): record.get("doc_sha256") for _, record in read_jsonl(corpus)}


def production_grounding(production: ModelVersion) -> tuple[Path, dict] | None:
    """The production artifact folder and its retrieval.json, when it answers from retrieved passages."""
    run_dir = Path(production.run_dir)
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").is_file() else {}
    from tailor.config import validate_config

    config = validate_config(manifest.get("config", {}), str(run_dir / "manifest.json"))
    folder = artifact_dir(run_dir, run_method(config, run_dir))
    if not (folder / RETRIEVAL_FILE).is_file():
        return None
    return folder, read_json(folder / RETRIEVAL_FILE)


def retrieval_index(folder: Path, retrieval: dict) -> Path:
    """The index a retrieval.json names: relative to its folder (a run folder can move), else by absolute path."""
    index = (folder / retrieval["index"]).resolve()
    return index if index.is_dir() else Path(retrieval["index_absolute"])


def refresh_documents(config: TailorConfig, root: Path, production: ModelVersion, cycle_dir: Path) -> dict:
    """Re-read the documents, compare them with production's corpus, and update a copy of a grounded production's
    index. Returns the stage's record: {status, added, changed, removed, corpus, index, embedded, reused}."""
    previous = Path(production.run_dir) / CORPUS
    if not config.sources:
        return {"status": "no sources in tailor.yaml", "added": [], "changed": [], "removed": []}
    if not previous.is_file():
        return {"status": f"production has no {CORPUS} to compare with", "added": [], "changed": [], "removed": []}
    folder = cycle_dir / "documents"
    corpus = folder / CORPUS
    ingest([str(root / source) for source in config.sources], corpus, config.ingest, progress=False)
    root = root.resolve()
    old, new = document_hashes(previous, root), document_hashes(corpus, root)
    record: dict = {
        "status": "compared", "corpus": str(corpus), "index": None,
        "added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
        "changed": sorted(source for source in set(new) & set(old) if new[source] != old[source])}
    grounding = production_grounding(production)
    changed = record["added"] or record["changed"] or record["removed"]
    if grounding is None or not changed:
        record["status"] = "unchanged" if not changed else "changed (production is not grounded: no index)"
        return record
    artifact, retrieval = grounding
    settings = retrieval["settings"]
    if settings.get("url"):
        raise TailorError(f"retrieval.url: production's index is on a server ({settings['url']}); update it with "
                          f"`tailor index` and set improve.documents: false")
    source_index = retrieval_index(artifact, retrieval)
    index = folder / "index"
    shutil.rmtree(index, ignore_errors=True)  # a rerun starts again from production's index
    shutil.copytree(source_index, index)
    from tailor.retrieval.index import build_index

    summary = build_index(corpus, index, embedding_model=settings.get("embedding_model"), show_progress=False)
    record.update(status="reindexed", index=str(index), embedded=summary.embedded, reused=summary.reused,
                  retrieval=retrieval)
    return record
