"""`tailor export`: a trained run as merged safetensors or an int8 CPU model, optionally verified against the run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import console


def export(run: Path = typer.Argument(..., help="Run folder with a trained artifact and manifest.json."),
           fmt: str = typer.Option("merged", "--format", "-f", help="merged (Hugging Face safetensors) or int8 "
                                   "(dynamic int8 for CPU serving); gguf is not yet supported."),
           out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/export/FORMAT)."),
           verify: bool = typer.Option(False, "--verify", help="Decode 5 golden prompts greedily with the adapter "
                                       "on the base and with the export; compare answers and logits."),
           tolerance: float = typer.Option(1e-3, "--tolerance", min=0.0, help="merged: largest allowed logit "
                                           "difference under --verify (answers must also match exactly)."),
           int8_tolerance: float = typer.Option(None, "--int8-tolerance", min=0.0, help="int8: largest allowed "
                                                "logit difference under --verify (default: report only).")) -> None:
    """Export the run's model for other runtimes; --verify fails (and writes nothing) when the export diverges."""
    from tailor.models.export import VerifyFailed, export_run

    try:
        result = export_run(run, fmt, out, verify=verify, tolerance=int8_tolerance if fmt == "int8" else tolerance)
    except VerifyFailed as exc:
        _print_report(exc.report)
        raise
    if result.verify is not None:
        _print_report(result.verify)
    loader = ("tailor.models.export.load_int8(folder)" if fmt == "int8"
              else "AutoModelForCausalLM.from_pretrained(folder)")
    console.print(f"[green]exported[/] {result.method} as {fmt} → {result.folder} ({len(result.files)} files; "
                  f"load with {loader})", highlight=False)


def _print_report(report) -> None:
    table = Table(title=f"--verify: adapter on base vs {report.format} export")
    for column in ("prompt", "same answer", "max logit diff", "export's answer"):
        table.add_column(column)
    for prompt, match, diff, answer in zip(report.prompts, report.matches, report.logit_diffs,
                                           report.export_answers, strict=True):
        table.add_row(prompt, "yes" if match else "[red]no[/]", f"{diff:.2e}", answer[:60])
    console.print(table)
    bound = "report only" if report.tolerance is None else f"tolerance {report.tolerance:g}"
    console.print(f"exact match {report.exact_match:.0%}, largest logit difference {report.max_logit_diff:.3g} "
                  f"({bound})", highlight=False)
