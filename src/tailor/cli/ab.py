"""`tailor ab report`: how the versions behind an A/B alias compare, from the server's feedback database."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import RunOption, WorkspaceOption, console, open_workspace, run_folder

ab_app = typer.Typer(help="A/B tests of model versions served under one alias (serve.aliases).", no_args_is_help=True)


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


@ab_app.command("report")
def report(alias: str = typer.Option(None, "--alias", "-a", help="Only this alias (default: every alias)."),
           db: Path = typer.Option(None, "--db", help="Feedback database (default: RUN/serve.feedback_db, else the "
                                   "workspace's)."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
           run: Path = RunOption, workspace: Path = WorkspaceOption) -> None:
    """Per version: completions, feedback rate, up-rate, latency; and each version against the most-used one
    (Fisher's exact and two-proportion z-test on up/down, Mann-Whitney U on latency)."""
    from tailor.serve.ab import report as ab_report

    if db is None:
        config, root = open_workspace(workspace, [], required=False)
        run_dir = run_folder(root, run)
        db = (run_dir if run_dir.is_dir() else root) / config.serve.feedback_db
    result = ab_report(db, alias)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if not result:
        console.print(f"no completions were served under an alias in {db}")
    for name, rows in result.items():
        table = Table("version", "answers", "rated", "up / down", "up-rate", "p50 ms", "p95 ms", "first token ms",
                      "p up-rate", "p latency", title=f"alias {name}")
        for row in rows:
            p_rate = None if row.get("fisher_p") is None else f"{row['fisher_p']:.3g} (z {row['z_test_p']:.3g})"
            table.add_row(row["model"] + ("" if "vs" in row else " (control)"), str(row["completions"]),
                          _fmt(row["feedback_rate"], ".0%"), f"{row['up']} / {row['down']}",
                          _fmt(row["up_rate"], ".0%"),
                          _fmt(row["latency_ms_p50"], ".0f"), _fmt(row["latency_ms_p95"], ".0f"),
                          _fmt(row["first_token_ms_p50"], ".0f"), p_rate or "—", _fmt(row.get("latency_p"), ".3g"))
        console.print(table)
    console.print("p up-rate: Fisher's exact test (two-proportion z-test) against the control; p latency: "
                  "Mann-Whitney U. p < 0.05: unlikely to be chance.")
