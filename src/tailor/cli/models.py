"""`tailor models`: the registry of model versions: list, show, diff, register, promote, rollback, history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tailor.cli.common import WorkspaceOption, console, open_workspace

models_app = typer.Typer(help="Registered model versions: lineage, stages, promotion and rollback.",
                         no_args_is_help=True)

ByOption = typer.Option(None, "--by", help="Who makes the change (default: $USER).")
ReasonOption = typer.Option("", "--reason", help="Why; kept in the audit log.")


def _registry(workspace: Path):
    from tailor.registry import open_registry

    config, root = open_workspace(workspace, [], required=False)
    return open_registry(config, root)


def _show_value(value: Any) -> str:
    from tailor.registry.diff import MISSING

    if value is MISSING:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _headline_metric(metrics: dict, method: str) -> str:
    tuned = metrics.get("eval", {}).get(method, {})
    if "token_f1" in tuned:
        return f"F1 {tuned['token_f1']:.3f}"
    loss = metrics.get("train", {}).get("eval_loss") or metrics.get("train", {}).get("train_loss")
    return f"loss {loss:.3f}" if isinstance(loss, int | float) else "-"


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


@models_app.command("list")
def list_versions(name: str = typer.Argument(None, help="Only this model's versions."),
                  workspace: Path = WorkspaceOption) -> None:
    """Every registered version with its stage, method and headline metric."""
    versions = _registry(workspace).versions(name)
    if not versions:
        console.print("no models registered yet; `tailor models register RUN --name NAME` adds one")
        return
    table = Table(title="Registered models")
    for column in ("name", "version", "stage", "method", "metric", "parent", "created (UTC)", "run"):
        table.add_column(column, justify="right" if column == "version" else "left")
    labels = {v.id: v.label for v in versions}
    for v in versions:
        style = "bold green" if v.stage == "production" else ("dim" if v.stage == "archived" else "")
        table.add_row(v.name, str(v.version), f"[{style}]{v.stage}[/]" if style else v.stage, v.method,
                      _headline_metric(v.metrics, v.method), labels.get(v.parent_id, "-" if v.parent_id is None
                                                                         else f"#{v.parent_id}"),
                      _when(v.created_at), v.run_dir)
    console.print(table)


@models_app.command("show")
def show(ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@STAGE (e.g. city@production)."),
         verify: bool = typer.Option(False, "--verify", help="Check every artifact file against its checksum."),
         workspace: Path = WorkspaceOption) -> None:
    """One version's lineage: base model, data hashes, code, config, metrics, artifacts and stage history."""
    from tailor.registry.diff import flatten

    registry = _registry(workspace)
    version = registry.resolve(ref, verify=verify)
    parent = registry.parent_of(version)
    summary = Table(title=f"{version.label} ({version.stage})", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value")
    for field, value in (("stage", version.stage), ("method", version.method), ("base model", version.base_model),
                         ("run folder", version.run_dir), ("code version", version.code_version),
                         ("parent", parent.label if parent else "-"), ("created (UTC)", _when(version.created_at))):
        summary.add_row(field, value)
    for path, digest in version.datasets.items():
        summary.add_row("dataset", f"{path}  sha256 {digest[:16]}…")
    for path, digest in version.artifacts.items():
        summary.add_row("artifact", f"{path}  sha256 {digest[:16]}…")
    for key, value in flatten(version.metrics).items():
        summary.add_row(f"metric {key}", _show_value(value))
    console.print(summary)
    config = flatten(version.config)
    console.print(f"config: {len(config)} keys, e.g. train.method={config.get('train.method')}, "
                  f"train.learning_rate={config.get('train.learning_rate')} (`tailor models diff` compares two)",
                  highlight=False)
    _print_history(registry.history(version_id=version.id), title=f"Stage history of {version.label}")
    if verify:
        console.print(f"[green]verified[/] {len(version.artifacts)} artifact files match their checksums")


@models_app.command("diff")
def diff(old: str = typer.Argument(..., help="First version, e.g. city@1 or city@production."),
         new: str = typer.Argument(..., help="Second version, e.g. city@2."),
         workspace: Path = WorkspaceOption) -> None:
    """Lineage, config (dotted keys, old → new) and metric differences between two versions."""
    from tailor.registry.diff import diff_versions

    registry = _registry(workspace)
    labels = {version.id: version.label for version in registry.versions()}
    result = diff_versions(registry.resolve(old), registry.resolve(new), labels)
    a, b = result.old.label, result.new.label
    for title, rows in (("lineage", result.lineage), ("config", result.config)):
        if not rows:
            console.print(f"{title}: identical")
            continue
        table = Table(title=f"{title}: {a} → {b}")
        for column in ("key", a, b):
            table.add_column(column)
        for key, before, after in rows:
            table.add_row(key, _show_value(before), _show_value(after))
        console.print(table)
    if not result.metrics:
        console.print("metrics: neither version has any")
        return
    table = Table(title=f"metrics: {a} → {b}")
    for column in ("metric", a, b, "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, before, after, delta in result.metrics:
        table.add_row(key, _show_value(before), _show_value(after), "" if delta is None else f"{delta:+.4g}")
    console.print(table)


@models_app.command("register")
def register(run: Path = typer.Argument(..., help="Run folder with a trained artifact and manifest.json."),
             name: str = typer.Option(..., "--name", "-n", help="Model name; the run becomes its next version."),
             parent: str = typer.Option(None, "--parent", help="The version this one was derived from, NAME@V."),
             by: str = ByOption, reason: str = ReasonOption, workspace: Path = WorkspaceOption) -> None:
    """Record a trained run as a candidate version, with its lineage and artifact checksums."""
    version = _registry(workspace).register_run(run, name, parent, by=by, reason=reason)
    console.print(f"[green]registered[/] {version.label} ({version.method}, {len(version.artifacts)} artifact "
                  f"files checksummed) as candidate", highlight=False)


@models_app.command("promote")
def promote(name: str = typer.Argument(..., help="Model name."),
            version: str = typer.Argument(..., help="Version number (or a stage, or 'latest')."),
            stage: str = typer.Option(..., "--stage", "-s", help="candidate, staging, production or archived."),
            by: str = ByOption, reason: str = ReasonOption, workspace: Path = WorkspaceOption) -> None:
    """Move a version to a stage; promoting to production archives the version that was there."""
    for change in _registry(workspace).promote(name, version, stage, by=by, reason=reason):
        console.print(f"{change.version.label}: {change.from_stage} → [bold]{change.to_stage}[/]"
                      + (" (replaced)" if change.action == "demote" else ""), highlight=False)


@models_app.command("rollback")
def rollback(name: str = typer.Argument(..., help="Model name."), by: str = ByOption, reason: str = ReasonOption,
             workspace: Path = WorkspaceOption) -> None:
    """Put the previous production version back in production; the current one is archived."""
    rolled_back, restored = _registry(workspace).rollback(name, by=by, reason=reason)
    console.print(f"[green]rolled back[/] {rolled_back.label} → archived; {restored.label} → production",
                  highlight=False)


@models_app.command("history")
def history(name: str = typer.Argument(..., help="Model name."), workspace: Path = WorkspaceOption) -> None:
    """The audit log of a model: every stage change, when, by whom and why."""
    _print_history(_registry(workspace).history(name), title=f"Stage history of {name}")


def _print_history(rows, title: str) -> None:
    table = Table(title=title)
    for column in ("when (UTC)", "version", "action", "from", "to", "by", "reason"):
        table.add_column(column)
    for change in rows:
        table.add_row(_when(change.changed_at), change.version.label, change.action, change.from_stage or "-",
                      change.to_stage, change.changed_by, change.reason)
    console.print(table)
