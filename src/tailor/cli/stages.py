"""The pipeline stages as commands: ingest, data, train, eval."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.workspace import update_manifest, write_json

data_app = typer.Typer(help="Build datasets from question/answer files.", no_args_is_help=True)


def ingest(sources: list[Path] = typer.Argument(None, help="Files or folders (default: `sources` in tailor.yaml)."),
           output: Path = typer.Option(None, "--output", "-o", help="Output JSONL (default: RUN/corpus.jsonl)."),
           workspace: Path = WorkspaceOption, run: Path = RunOption,
           no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Read documents (txt, md, html, pdf) into normalized, deduplicated chunks in corpus.jsonl."""
    from tailor.data.ingest import ingest as run_ingest

    config, root = open_workspace(workspace, [], required=not sources)
    run_dir = run_folder(root, run)
    names = [str(s) for s in sources] if sources else [str(root / s) for s in config.sources]
    output = output or run_dir / "corpus.jsonl"
    summary = run_ingest(names, output, chunk_chars=config.ingest.chunk_chars,
                         chunk_overlap=config.ingest.chunk_overlap, min_chars=config.ingest.min_chars,
                         progress=not no_progress)
    write_json(output.with_name(output.stem + ".report.json"), summary.to_dict())
    if output.parent == run_dir:
        update_manifest(run_dir, "ingest", outputs=[output],
                        metrics={"records": summary.records, "files_read": summary.files_read,
                                 "duplicates": len(summary.duplicates), "skipped": len(summary.skipped)})
    console.print(f"[green]ingested[/] {summary.files_read} files, {summary.documents} documents → "
                  f"{summary.records} records in {output}")
    for removed, kept in summary.duplicates:
        console.print(f"  duplicate removed: {removed} (kept {kept})")
    for path, reason in summary.skipped:
        console.print(f"  [yellow]skipped[/] {path}: {reason}")
    for warning in summary.warnings:
        console.print(f"  [yellow]warning[/] {warning}")


@data_app.command("build")
def data_build(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption,
               run: Path = RunOption) -> None:
    """Question/answer files (CSV or JSONL) → chat records in RUN/data/train.jsonl and eval.jsonl."""
    from tailor.data.build import build_chat_data

    config, root = open_workspace(workspace, overrides)
    run_dir = run_folder(root, run)
    summary = build_chat_data(config, root, run_dir)
    console.print(f"[green]data[/] {summary.train} training and {summary.eval} evaluation records → "
                  f"{run_dir / 'data'}")
    for problem in summary.too_long + summary.duplicates:
        console.print(f"  [yellow]dropped[/] {problem}")


def train(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
          method: str = typer.Option(None, "--method", "-m", help="Method name (overrides train.method)."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Customize the base model on RUN/data with the configured method (LoRA by default)."""
    from tailor.train.run import ADAPTER_DIR, run_training

    overrides = list(overrides or []) + ([f"train.method={method}"] if method else [])
    config, root = open_workspace(workspace, overrides)
    run_dir = run_folder(root, run)
    result = run_training(config, root, run_dir, resume=resume, show_progress=not no_progress)
    eval_text = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"[green]trained[/] {config.train.method}: {result.steps} steps in {result.seconds:.0f} s, "
                  f"train loss {result.train_loss:.4f}{eval_text}, {result.tokens_per_s:,.0f} tokens/s → "
                  f"{run_dir / ADAPTER_DIR}")


def evaluate(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
             no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")) -> None:
    """Base and customized model on the held-out questions: token F1, exact match, eval loss, perplexity."""
    from tailor.evaluate.harness import report_table, run_eval

    config, root = open_workspace(workspace, overrides)
    run_dir = run_folder(root, run)
    report = run_eval(config, root, run_dir, show_progress=not no_progress)
    console.print(report_table(report))
    console.print(f"report: {run_dir / 'eval' / 'report.json'}")


def methods(workspace: Path = WorkspaceOption,
            count: bool = typer.Option(True, "--count/--no-count",
                                       help="Count trainable parameters on the configured base model.")) -> None:
    """List the customization methods, cheapest first, with their trainable-parameter counts."""
    from tailor.methods import registry

    config, root = open_workspace(workspace, [], required=False)
    table = Table(title="Customization methods")
    table.add_column("method")
    table.add_column("trainable parameters", justify="right")
    table.add_column("summary")
    model_ref = None
    if count:
        from tailor.models.base import resolve_base_model

        model_ref = resolve_base_model(config.base_model, root=root)
    for name in registry.names():
        method = registry.get(name)
        params = "-"
        if model_ref is not None and method.prepare is not None:
            from tailor.models.base import load_model

            prepared = method.prepare(load_model(model_ref), config.method_options(name))
            params = f"{sum(p.numel() for p in prepared.parameters() if p.requires_grad):,}"
        table.add_row(name, params, method.summary)
    console.print(table)
