"""`tailor index` (build or update the retrieval index of the corpus) and `tailor search` (ask it a question)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, open_workspace, run_folder


def build_run_index(config, root: Path, run_dir: Path, *, corpus: Path | None = None, show_progress: bool = True):
    """Index RUN/corpus.jsonl (or `corpus`) into the configured index folder; returns the IndexSummary."""
    from tailor.retrieval.grounding import index_folder
    from tailor.retrieval.index import build_index
    from tailor.workspace import update_manifest

    settings = config.retrieval
    corpus = corpus or Path(run_dir) / "corpus.jsonl"
    folder = index_folder(config, root, run_dir)
    summary = build_index(corpus, folder, embedding_model=settings.embedding_model, url=settings.url,
                          collection=settings.collection or f"tailor-{config.project}", show_progress=show_progress)
    if Path(run_dir).is_dir():
        update_manifest(run_dir, "index", inputs=[corpus], outputs=[folder],
                        metrics={"chunks": summary.chunks, "documents": summary.documents,
                                 "embedded": summary.embedded, "reused": summary.reused, "seconds": summary.seconds},
                        extra={"server": summary.server})
    return summary, folder


def index(workspace: Path = WorkspaceOption, run: Path = RunOption,
          corpus: Path = typer.Option(None, "--corpus", help="Corpus JSONL (default: RUN/corpus.jsonl)."),
          overrides: list[str] = OverridesArgument,
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Build or update the retrieval index of the corpus: BM25 + dense vectors (all-MiniLM-L6-v2), embedded in the
    run folder or on a Chroma server (retrieval.url); only added or changed documents are embedded again."""
    config, root = open_workspace(workspace, overrides, required=False)
    summary, folder = build_run_index(config, root, run_folder(root, run), corpus=corpus,
                                      show_progress=not no_progress)
    changes = ", ".join(f"{len(names)} {what}" for what, names in (("added", summary.added),
                                                                   ("changed", summary.changed),
                                                                   ("removed", summary.removed)) if names)
    console.print(f"[green]indexed[/] {summary.documents} documents, {summary.chunks} chunks in {summary.seconds} s "
                  f"({summary.embedded} embedded, {summary.reused} reused{'; ' + changes if changes else ''}) → "
                  f"{folder}" + (f"; vectors on {summary.server}" if summary.server else ""),
                  highlight=False, soft_wrap=True)


def search(question: str = typer.Argument(..., help="What to look up."),
           workspace: Path = WorkspaceOption, run: Path = RunOption,
           overrides: list[str] = OverridesArgument) -> None:
    """Show the passages the index retrieves for a question, with their sources and scores."""
    from tailor.retrieval.grounding import index_folder
    from tailor.retrieval.search import Retriever

    config, root = open_workspace(workspace, overrides, required=False)
    retriever = Retriever(index_folder(config, root, run_folder(root, run)), config.retrieval)
    found = retriever.retrieve(question)
    table = Table(title=f"{len(found.passages)} passages in {found.seconds * 1000:.0f} ms (best cosine "
                        f"{found.similarity:.2f}, coverage {found.coverage:.2f}"
                        f"{'; would abstain' if found.abstain else ''})")
    for column in ("#", "source", "score", "passage"):
        table.add_column(column, overflow="fold")
    for passage in found.passages:
        where = passage.source + (f" p.{passage.page}" if passage.page else "")
        table.add_row(str(passage.rank), where, f"{passage.score:.4f}", passage.text[:300])
    console.print(table)
