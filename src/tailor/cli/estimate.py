"""`tailor estimate`: tokens, training FLOPs, memory per method, and time and cost per hardware profile, before
training; compared with the measured time of past runs in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, open_workspace, run_folder


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 10:  # small runs on a GPU: "0 s" would read as free
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.1f} h"


def estimate(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
             method: str = typer.Option(None, "--method", "-m", help="Method name (overrides train.method)."),
             data: Path = typer.Option(None, "--data", help="Chat JSONL to count (default: RUN/data/train.jsonl)."),
             json_out: Path = typer.Option(None, "--json", help="Also write the estimate as JSON to this file."),
             registry: bool = typer.Option(True, "--registry/--no-registry", help="Compare with past runs in the "
                                           "registry and calibrate this machine's utilization on them.")) -> None:
    """Estimate a training run's tokens, FLOPs, memory, time and cost before running it."""
    from tailor.estimate import estimate as run_estimate
    from tailor.workspace import write_json

    overrides = list(overrides or []) + ([f"train.method={method}"] if method else [])
    config, root = open_workspace(workspace, overrides, required=False)
    data_path = data or run_folder(root, run) / "data" / "train.jsonl"
    store = None
    if registry:
        from tailor.registry import open_registry

        store = open_registry(config, root)
    result = run_estimate(config, root, data_path, registry=store)

    console.print(f"[bold]{result.method}[/] on {Path(result.base_model).name}: {result.params:,} parameters, "
                  f"{result.trainable:,} trainable; {result.data.records} records, {result.data.tokens:,} tokens per "
                  f"epoch (longest {result.data.max_tokens}); {result.steps} steps ≈ {result.epochs:.2f} epochs → "
                  f"{result.tokens:,} tokens, {result.flops:.3g} FLOPs", highlight=False)
    memory = Table(title="Memory needed to train (GiB)")
    for column in ("method", "trainable", "weights", "gradients", "AdamW states", "activations", "total",
                   "assumption"):
        memory.add_column(column, justify="left" if column in ("method", "assumption") else "right")
    for row in result.memory:
        memory.add_row(row.method, f"{row.trainable:,}", f"{row.weights_gib:.2f}", f"{row.gradients_gib:.3f}",
                       f"{row.optimizer_gib:.3f}", f"{row.activations_gib:.2f}", f"{row.total_gib:.2f}",
                       row.assumption)
    console.print(memory)
    hardware = Table(title=f"Time and cost of training {result.method}")
    for column in ("hardware", "peak TFLOP/s", "utilization", "time", "cost", "fits in memory", "source"):
        hardware.add_column(column, justify="left" if column in ("hardware", "source") else "right")
    for machine in result.hardware:
        fits = "-" if machine.fits_memory is None else ("yes" if machine.fits_memory else "[red]no[/]")
        cost = (f"${machine.dollars:.2f}" if machine.dollars >= 0.005 else "< $0.01") if machine.dollars else "-"
        hardware.add_row(machine.hardware, f"{machine.peak_tflops:.3g}", f"{machine.utilization:.0%}",
                         _duration(machine.hours), cost, fits, machine.source)
    console.print(hardware)
    if result.past_runs:
        past = Table(title="Past runs in the registry: this estimate's rule against the measured time")
        for column in ("version", "method", "tokens", "measured", "estimated", "estimated / measured"):
            past.add_column(column, justify="left" if column in ("version", "method") else "right")
        for past_run in result.past_runs:
            past.add_row(past_run.label, past_run.method, f"{past_run.tokens:,}",
                         _duration(past_run.measured_seconds / 3600), _duration(past_run.estimated_seconds / 3600),
                         f"{past_run.ratio:.2f}")
        console.print(past)
    console.print("assumptions:\n" + "\n".join(f"  - {line}" for line in result.assumptions), highlight=False)
    if json_out is not None:
        write_json(json_out, json.loads(json.dumps(result.to_dict(), default=str)))
        console.print(f"wrote {json_out}")
