"""`tailor prune`: compress the run's merged model (magnitude or structured pruning) and report the eval loss, size
and latency before and after."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import console


def prune(run: Path = typer.Argument(..., help="Run folder with a trained artifact and manifest.json."),
          method: str = typer.Option("magnitude", "--method", "-m", help="magnitude (unstructured, to a target "
                                     "sparsity) or structured (removes attention heads and MLP neurons)."),
          sparsity: float = typer.Option(0.5, "--sparsity", help="magnitude: share of decoder weights set to zero."),
          heads: float = typer.Option(0.0, "--heads", help="structured: share of attention heads removed."),
          neurons: float = typer.Option(0.0, "--neurons", help="structured: share of MLP neurons removed."),
          out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/export/pruned-METHOD)."),
          json_out: Path = typer.Option(None, "--json", help="Also write the report as JSON to this file.")) -> None:
    """Prune the merged model; print eval loss, size and latency before and after, and save the pruned model."""
    from tailor.models.prune import prune_run
    from tailor.workspace import write_json

    report = prune_run(run, method, sparsity=sparsity, heads=heads, neurons=neurons, out=out)
    table = Table(title=f"{method} pruning {report.settings}")
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="left" if not column else "right")
    b, a = report.before, report.after
    if b.eval_loss is not None and a.eval_loss is not None:
        table.add_row("eval loss (answers)", f"{b.eval_loss:.4f}", f"{a.eval_loss:.4f}",
                      f"{a.eval_loss - b.eval_loss:+.4f}")
    table.add_row("parameters", f"{b.parameters:,}", f"{a.parameters:,}", f"{a.parameters / b.parameters - 1:+.1%}")
    table.add_row("non-zero parameters", f"{b.nonzero_parameters:,}", f"{a.nonzero_parameters:,}",
                  f"{a.nonzero_parameters / b.nonzero_parameters - 1:+.1%}")
    table.add_row("size (MB, dense)", f"{b.size_bytes / 1e6:.1f}", f"{a.size_bytes / 1e6:.1f}",
                  f"{a.size_bytes / b.size_bytes - 1:+.1%}")
    table.add_row("latency (ms/token)", f"{b.ms_per_token:.1f}", f"{a.ms_per_token:.1f}",
                  f"{a.ms_per_token / b.ms_per_token - 1:+.1%}")
    table.add_row("decoder sparsity", "", f"{report.sparsity:.1%}", "")
    for key, (old, new) in report.shapes.items():
        table.add_row(key.replace("_", " "), str(old), str(new), "")
    console.print(table)
    if b.eval_loss is None:
        console.print("[yellow]no RUN/data/eval.jsonl: eval loss not measured[/]")
    if json_out is not None:
        write_json(json_out, report.to_dict())
    console.print(f"[green]pruned[/] → {report.folder} (load with AutoModelForCausalLM.from_pretrained)",
                  highlight=False)
