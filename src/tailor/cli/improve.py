"""`tailor improve`: the feedback loop (collect → data → train → eval → gates → register → canary → decide), and the
review queue of corrections it trains on (`tailor feedback queue`, `tailor feedback review`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tailor.cli.common import OverridesArgument, WorkspaceOption, console, open_workspace
from tailor.errors import TailorError


def improve(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption,
            decide: bool = typer.Option(False, "--decide", help=(
                "Only decide the running canary (promote, roll back or wait); never start a new cycle.")),
            by: str = typer.Option(None, "--by", help="Who runs it, in the audit log (default: $USER)."),
            no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars.")) -> None:
    """Advance the improvement cycle as far as it goes: feedback since the production version → training data →
    LoRA on top of production → eval against it → gates → registry → canary; with a canary running, promote it
    when the A/B test is significant or roll it back when a monitor rule fires. Idempotent and resumable (state in
    improve.folder); one run at a time (a lock). Exit 0: advanced, waiting or promoted; 1: error; 3: the candidate
    was refused by the gates or rolled back."""
    from tailor.improve.pipeline import run_improve

    config, root = open_workspace(workspace, overrides)
    result = run_improve(config, root, by=by, decide_only=decide, show_progress=not no_progress,
                         say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
    colour = {"promoted": "green", "refused": "red", "rolled_back": "red"}.get(result.outcome, "bold")
    console.print(f"[{colour}]{result.outcome}[/]: {escape(result.message)}", highlight=False, soft_wrap=True)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _store(workspace: Path, db: Path | None):
    from tailor.registry import open_registry
    from tailor.serve.feedback import FeedbackStore

    config, root = open_workspace(workspace, [], required=False)
    if db is None:
        from tailor.improve.collect import feedback_path
        from tailor.improve.pipeline import model_name

        production = open_registry(config, root).resolve(f"{model_name(config)}@production")
        db = feedback_path(config, root, production)
    if not Path(db).is_file():
        raise TailorError(f"--db: {db} not found")
    return FeedbackStore(db)


DbOption = typer.Option(None, "--db", help=(
    "Feedback database (default: improve.feedback_db, else the production run's serve.feedback_db)."))


def queue(db: Path = DbOption, show_all: bool = typer.Option(False, "--all", help="Reviewed corrections too."),
          workspace: Path = WorkspaceOption) -> None:
    """Corrections waiting for review (accept, edit or reject them with `tailor feedback review`)."""
    store = _store(workspace, db)
    try:
        rows = store.rows("f.correction IS NOT NULL" + ("" if show_all else " AND f.review IS NULL"))
    finally:
        store.close()
    if not rows:
        console.print("no corrections wait for review")
        return
    table = Table("id", "model", "question", "answer", "correction", "review", title="corrections")
    for row in rows:
        import json

        question = next((m["content"] for m in reversed(json.loads(row["prompt"])) if m["role"] == "user"), "")
        table.add_row(str(row["id"]), row["model"], question, row["answer"],
                      row["reviewed_correction"] or row["correction"], row["review"] or "pending")
    console.print(table)


def review(ids: list[int] = typer.Argument(..., help="Feedback ids (see `tailor feedback queue`)."),
           accept: bool = typer.Option(False, "--accept", help="Accept the corrections (they train next cycle)."),
           reject: bool = typer.Option(False, "--reject", help="Reject them (never trained on)."),
           edit: str = typer.Option(None, "--edit", help="Accept one correction with this text instead."),
           note: str = typer.Option(None, "--note", help="Why; kept with the review."),
           by: str = typer.Option(None, "--by", help="Who reviews (default: $USER)."),
           db: Path = DbOption, workspace: Path = WorkspaceOption) -> None:
    """Accept, edit or reject corrections in the review queue; `tailor improve` trains on accepted ones."""
    from tailor.registry.store import current_user

    if sum((accept, reject, edit is not None)) != 1:
        raise TailorError("review: give exactly one of --accept, --reject or --edit TEXT")
    if edit is not None and len(ids) != 1:
        raise TailorError("--edit: give one feedback id")
    store = _store(workspace, db)
    try:
        for feedback_id in ids:
            done = store.review(feedback_id, "rejected" if reject else "accepted", by=current_user(by),
                                correction=edit, note=note)
            console.print(f"feedback {feedback_id}: {done['review']}"
                          + (f" → {escape(done['correction'])}" if done["correction"] else ""), highlight=False)
    finally:
        store.close()
