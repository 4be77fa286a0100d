"""`tailor export`: a trained run (or a registered version) as merged safetensors, an int8 CPU model, a GGUF file for
llama.cpp, or its prompt artifacts; optionally verified against the run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import WorkspaceOption, console


def export(run: str = typer.Argument(..., help="Run folder with a trained artifact and manifest.json, or a "
                                     "registered version NAME@VERSION / NAME@production (checksums are checked)."),
           fmt: str = typer.Option("merged", "--format", "-f", help="merged (Hugging Face safetensors), int8 "
                                   "(dynamic int8 for CPU serving), gguf (f16 GGUF for llama.cpp), gguf-q8_0 "
                                   "(Q8_0 GGUF), or prompt (prompt-learning adapter, prompt table and profile)."),
           out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/export/FORMAT)."),
           verify: bool = typer.Option(False, "--verify", help="Decode 5 golden prompts greedily with the adapter "
                                       "on the base and with the export (gguf: in llama.cpp, or transformers' "
                                       "GGUF reader without llama-cpp-python); compare answers and logits."),
           tolerance: float = typer.Option(1e-3, "--tolerance", min=0.0, help="merged: largest allowed logit "
                                           "difference under --verify (answers must also match exactly)."),
           int8_tolerance: float = typer.Option(None, "--int8-tolerance", min=0.0, help="int8: largest allowed "
                                                "logit difference under --verify (default: report only)."),
           gguf_tolerance: float = typer.Option(None, "--gguf-tolerance", min=0.0, help="gguf: largest allowed "
                                                "logit difference under --verify (default: report only)."),
           workspace: Path = WorkspaceOption) -> None:
    """Export the run's model for other runtimes; --verify fails (and writes nothing) when the export diverges."""
    from tailor.models.export import LOADERS, VerifyFailed, export_run

    run_dir, checksums = _resolve(run, workspace)
    bound = {"int8": int8_tolerance, "gguf": gguf_tolerance, "gguf-q8_0": gguf_tolerance}.get(fmt, tolerance)
    try:
        result = export_run(run_dir, fmt, out, verify=verify, tolerance=bound, expected_checksums=checksums)
    except VerifyFailed as exc:
        _print_report(exc.report)
        raise
    if result.verify is not None:
        _print_report(result.verify)
    console.print(f"[green]exported[/] {result.method} as {fmt} → {result.folder} ({len(result.files)} files; "
                  f"load with {LOADERS[fmt]})", highlight=False)


def _resolve(run: str, workspace: Path) -> tuple[Path, dict[str, str] | None]:
    """A folder is a run; NAME@V is looked up in the registry, whose checksums the export then checks."""
    if Path(run).is_dir() or "@" not in run:
        return Path(run), None
    from tailor.cli.common import open_workspace
    from tailor.registry import open_registry

    config, root = open_workspace(workspace, [], required=False)
    version = open_registry(config, root).resolve(run)
    return Path(version.run_dir), version.artifacts


def _print_report(report) -> None:
    table = Table(title=f"--verify: adapter on base vs {report.format} export")
    for column in ("prompt", "same answer", "max logit diff", "export's answer"):
        table.add_column(column)
    for prompt, match, diff, answer in zip(report.prompts, report.matches, report.logit_diffs,
                                           report.export_answers, strict=True):
        table.add_row(prompt, "yes" if match else "[red]no[/]", f"{diff:.2e}", answer[:60])
    console.print(table)
    bound = "report only" if report.tolerance is None else f"tolerance {report.tolerance:g}"
    tokens = ""
    if report.tokenizer_match:
        tokens = (f"; {report.reader} tokenizes {sum(report.tokenizer_match)}/{len(report.tokenizer_match)} "
                  "prompts alike")
    console.print(f"exact match {report.exact_match:.0%}, largest logit difference {report.max_logit_diff:.3g} "
                  f"({bound}){tokens}", highlight=False)
