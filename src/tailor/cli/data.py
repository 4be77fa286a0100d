"""More `tailor data` commands: synth (Q/A pairs written by a model from the corpus) and inspect (a dataset's
statistics, plots and loss mask). They register on the `data` group defined in stages.py."""

from __future__ import annotations

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
          model: str = typer.Option(None, "--model", help="Model that writes the pairs (default: base_model)."),
          chunks: int = typer.Option(0, "--chunks", min=0, help="Only the first N chunks (0: all)."),
          per_chunk: int = typer.Option(3, "--per-chunk", min=1, max=20, help="Pairs asked for per chunk."),
          threshold: float = typer.Option(0.75, "--threshold", min=0.01, max=1.0, help=(
              "Keep a pair when at least this share of its answer's content words occur in the chunk (and all "
              "its numbers).")),
          max_new_tokens: int = typer.Option(200, "--max-new-tokens", min=16, help="Tokens generated per chunk."),
          workspace: Path = WorkspaceOption, run: Path = RunOption,
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Write question/answer pairs per corpus chunk with a model; keep those grounded in their chunk."""
    from tailor.data.synth import synthesize
    from tailor.models.base import resolve_base_model

    config, root = open_workspace(workspace, [], required=False)
    run_dir = run_folder(root, run)
    corpus = corpus or run_dir / "corpus.jsonl"
    output = output or run_dir / "data" / "synth.jsonl"
    model_ref = resolve_base_model(model or config.base_model, root=root)
    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=no_progress) as bar:
        task = bar.add_task("synth", total=None)

        def advance(count: int) -> None:
            bar.update(task, advance=count)

        report = synthesize(corpus, model_ref, per_chunk=per_chunk, max_chunks=chunks, threshold=threshold,
                            max_new_tokens=max_new_tokens, on_chunk=advance)
    if not report.kept:
        write_json(output.with_name(output.stem + ".report.json"), report.to_dict())
        raise TailorError(f"synth: none of the {report.generated} generated pairs from {report.chunks} chunks passed "
                          f"the grounding filter (--threshold {threshold}); see "
                          f"{output.with_name(output.stem + '.report.json')}")
    write_jsonl(output, report.kept)
    write_json(output.with_name(output.stem + ".report.json"), report.to_dict())
    console.print(f"[green]synth[/] {report.chunks} chunks → {report.generated} pairs generated, {len(report.kept)} "
                  f"kept (grounding ≥ {threshold}) → {output}", soft_wrap=True, highlight=False)
    for rejected in report.rejected[:5]:
        console.print(f"  [yellow]rejected[/] {escape(rejected['question'])} → {escape(rejected['answer'])} "
                      f"({escape(rejected['reason'])})", soft_wrap=True, highlight=False)


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
