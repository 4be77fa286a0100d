"""More `tailor data` commands: synth (Q/A pairs written by a model from the corpus) and inspect (a dataset's
statistics, plots and loss mask). They register on the `data` group defined in stages.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tailor.cli.common import RunOption, WorkspaceOption, console, err_console, open_workspace, run_folder
from tailor.cli.stages import data_app
from tailor.errors import TailorError
from tailor.workspace import write_json, write_jsonl


@data_app.command("synth")
def synth(corpus: Path = typer.Option(None, "--corpus", help="Corpus JSONL (default: RUN/corpus.jsonl)."),
          output: Path = typer.Option(None, "--output", "-o", help="Q/A JSONL to write (default: "
                                      "RUN/data/synth.jsonl); usable as data.qa_files."),
          teacher: str = typer.Option(None, "--teacher", "--model", help=(
              "Model that writes the pairs: a model name or folder (default: base_model), or any OpenAI-compatible "
              "server as endpoint:URL#MODEL.")),
          chunks: int = typer.Option(0, "--chunks", min=0, help=(
              "Only N chunks, taken round-robin over the documents (0: every chunk).")),
          per_chunk: int = typer.Option(3, "--per-chunk", min=1, max=20, help="Pairs asked for per chunk."),
          mode: str = typer.Option("answer-first", "--mode", help=(
              "answer-first: the chunk's fact sentences are the answers and the teacher writes their questions; "
              "free: the teacher writes questions and answers, the grounding filter keeps faithful ones.")),
          phrasings: int = typer.Option(2, "--phrasings", min=0, max=10, help=(
              "Other wordings asked for each kept question (same answer and chunk).")),
          threshold: float = typer.Option(0.75, "--threshold", min=0.01, max=1.0, help=(
              "Keep a pair when at least this share of its answer's content words occur in the chunk (and all "
              "its numbers).")),
          max_new_tokens: int = typer.Option(200, "--max-new-tokens", min=16, help="Tokens generated per chunk."),
          batch_size: int = typer.Option(16, "--batch-size", min=1, help="Chunks sent to the teacher at once."),
          judge: str = typer.Option(None, "--judge", help=(
              "Also keep only pairs this judge scores at least --min-judge-score (1-5) for answering the question "
              "from the passage: base, a run or exported model folder, or endpoint:URL#MODEL. A judge much bigger "
              "than the default model is needed (the default model scores at chance).")),
          min_judge_score: int = typer.Option(3, "--min-judge-score", min=1, max=5, help=(
              "The judge score a pair needs (with --judge).")),
          restart: bool = typer.Option(False, "--restart", help="Ignore the progress of an interrupted run."),
          workspace: Path = WorkspaceOption, run: Path = RunOption,
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Write question/answer pairs per corpus chunk with a teacher model; keep those grounded in their chunk, and
    other wordings of each kept question. Resumes an interrupted run."""
    from tailor.data.synth import open_teacher, synthesize

    config, root = open_workspace(workspace, [], required=False)
    run_dir = run_folder(root, run)
    corpus = corpus or run_dir / "corpus.jsonl"
    output = output or run_dir / "data" / "synth.jsonl"
    progress_file = output.with_name(output.stem + ".progress.jsonl")
    if restart:
        progress_file.unlink(missing_ok=True)
    if not corpus.is_file():
        raise TailorError(f"{corpus}: corpus not found; run `tailor ingest` first")
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeRemainingColumn())
    judge_spec = None
    if judge:  # checked (folder exists, endpoint answers) before the teacher loads
        from tailor.evaluate.sources import check_endpoint, parse_spec

        # named as written, so that a resumed run with another judge starts over
        judge_spec = parse_spec(judge, judge, root=root, run_dir=run_dir, where="--judge")
        if judge_spec.kind == "endpoint":
            check_endpoint(judge_spec)
    model = open_teacher(teacher or config.base_model, root=root, batch_size=batch_size, dtype=config.train.dtype)
    try:
        with Progress(*columns, console=err_console, transient=True, disable=no_progress) as bar, \
                _opened_judge(judge_spec, config, root) as judge_model:
            task = bar.add_task("synth", total=chunks or None)

            def advance(count: int) -> None:
                bar.update(task, advance=count)

            report = synthesize(corpus, model, per_chunk=per_chunk, max_chunks=chunks, threshold=threshold,
                                phrasings=phrasings, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                seed=config.data.seed, mode=mode, progress=progress_file, on_chunk=advance,
                                judge=judge_model, min_judge_score=min_judge_score)
    finally:
        model.close()
    report_path = output.with_name(output.stem + ".report.json")
    write_json(report_path, report.to_dict())
    if not report.kept:
        raise TailorError(f"synth: none of the {report.generated} generated pairs from {report.chunks} chunks passed "
                          f"the grounding filter (--threshold {threshold}); see {report_path}")
    write_jsonl(output, report.kept)
    summary = report.to_dict()
    console.print(f"[green]synth[/] {report.chunks} chunks of {summary['coverage']['documents_with_pairs']}/"
                  f"{report.documents} documents → {report.generated} pairs generated, "
                  f"{len(report.kept) - report.phrasings} kept (grounding ≥ {threshold}) + {report.phrasings} "
                  f"rephrased, {summary['chunks_per_s']} chunks/s → {output}", soft_wrap=True, highlight=False)
    for rejected in report.rejected[:5]:
        console.print(f"  [yellow]rejected[/] {escape(rejected['question'])} → {escape(rejected['answer'])} "
                      f"({escape(rejected['reason'])})", soft_wrap=True, highlight=False)


@contextlib.contextmanager
def _opened_judge(spec, config, root: Path):
    """The synth judge loaded for the block (None without --judge), released after it."""
    if spec is None:
        yield None
        return
    from tailor.evaluate.sources import open_model
    from tailor.models.base import pick_dtype, resolve_base_model

    with open_model(spec, config, resolve_base_model(config.base_model, root=root),
                    pick_dtype(config.train.dtype)) as judge:
        yield judge


@data_app.command("inspect")
def inspect(file: Path = typer.Argument(..., help="A dataset: chat, Q/A or classification JSONL/CSV, or corpus."),
            html_out: Path = typer.Option(None, "--html", help="Self-contained HTML report (default: FILE's name "
                                          "with .inspect.html beside it)."),
            tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the configured "
                                           "base model's)."),
            preview: int = typer.Option(3, "--preview", min=0, help="Records shown with their loss mask."),
            workspace: Path = WorkspaceOption) -> None:
    """Counts, token-length statistics and histogram, role and label distributions, and the loss mask (which
    tokens are trained on) in the terminal and in an HTML page."""
    from rich.table import Table
    from rich.text import Text

    from tailor.data.inspect import inspect_file, render_html
    from tailor.models.base import load_tokenizer, resolve_base_model
    from tailor.workspace import atomic_write_text

    config, root = open_workspace(workspace, [], required=False)
    loaded = load_tokenizer(str(tokenizer) if tokenizer else resolve_base_model(config.base_model, root=root))
    found = inspect_file(file, loaded, preview=preview)
    summary = found.to_dict()
    console.print(f"[bold]{escape(str(file))}[/]: {found.records} records ({found.kind})", highlight=False,
                  soft_wrap=True)
    table = Table(title="tokens per record")
    for key in summary["tokens"]:
        table.add_column(key, justify="right")
    table.add_row(*(str(value) for value in summary["tokens"].values()))
    console.print(table)
    for title, counts in (("roles", summary["roles"]), ("messages per record", summary["messages_per_record"]),
                          ("labels", summary["labels"])):
        if counts:
            console.print(f"{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    if summary["trained_token_share"] is not None:
        console.print(f"trained on: {summary['trained_token_share']:.0%} of tokens (assistant turns)",
                      highlight=False)
    for number, tokens in enumerate(found.previews, start=1):
        console.print(f"[bold]loss mask, record {number}[/] ([black on green]trained[/], [dim]context[/]):")
        text = Text()
        for token in tokens:
            text.append(token.text, style="black on green" if token.trained else "dim")
        console.print(text, soft_wrap=True)
    html_out = html_out or file.with_name(file.stem + ".inspect.html")
    atomic_write_text(html_out, render_html(found))
    console.print(f"html: {html_out}", soft_wrap=True, highlight=False)
