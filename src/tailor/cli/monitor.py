"""`tailor monitor`: the alerting rules checked against a running server without Prometheus (`check`), and the
drift report of questions the model could not answer (`drift`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import typer
from rich.table import Table

from tailor.cli.common import RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.errors import TailorError

monitor_app = typer.Typer(help="Watch a served model: alerting rules without Prometheus, and drift.",
                          no_args_is_help=True)

# exit status of `check`: 0 nothing fires, 1 an alert fires, 2 the check could not run
FIRING, BROKEN = 1, 2


def metrics_url(url: str) -> str:
    """`http://host:8000` means its /metrics; a URL with a path is taken as it is."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TailorError(f"--url: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return url if parts.path not in ("", "/") else url.rstrip("/") + "/metrics"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@monitor_app.command("check")
def check(url: str = typer.Option(..., "--url", "-u", help="The server (http://HOST:PORT) or its metrics URL."),
          rules: Path = typer.Option(None, "--rules", help=(
              "Prometheus rule file to evaluate (default: deploy/prometheus/alerts.yml shipped with tailor); its "
              "expressions must stay in the subset of tailor/monitor/promql.py.")),
          feedback_db: Path = typer.Option(None, "--feedback-db", help=(
              "The server's feedback database (serve.feedback_db): thumbs are then counted from it over each "
              "rule's own window, across restarts.")),
          interval: float = typer.Option(0.0, "--interval", min=0, help=(
              "Seconds between two scrapes; rates are measured between them. 0: one scrape, rates since the "
              "server started.")),
          api_key: str = typer.Option(None, "--api-key", envvar="TAILOR_API_KEY", help=(
              "A key with the admin scope, when the server has keys (or TAILOR_API_KEY).")),
          webhook: str = typer.Option(None, "--webhook", help=(
              "POST the firing alerts as JSON to this URL (nothing is posted when none fires).")),
          as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table.")) -> None:
    """Evaluate the alerting rules against a running server's /metrics; exit 1 when an alert fires, 2 when the
    check cannot run (unreadable rules, unreachable server, a rule reading a metric the server does not export)."""
    from tailor.monitor.check import ScrapeSource, post_webhook, scrape, threshold
    from tailor.monitor.check import check as evaluate
    from tailor.monitor.rules import DEFAULT_RULES, check_metrics, load_rules

    try:
        target = metrics_url(url)
        parsed = load_rules(rules or DEFAULT_RULES)
        first = scrape(target, api_key)
        check_metrics(parsed, first.exported, target)
        last = None
        if interval:
            time.sleep(interval)
            last = scrape(target, api_key)
        source = ScrapeSource(last or first, first if last else None, feedback_db)
        rows = evaluate(parsed, source)
        if webhook and any(row.firing for row in rows):
            post_webhook(webhook, rows, target)
    except TailorError as exc:
        exc.exit_code = BROKEN
        raise
    if as_json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
    else:
        measured = f"{interval:g} s between scrapes" if interval else "since the server started"
        table = Table("alert", "severity", "series", "value", "threshold", "for", "state",
                      title=f"{target} ({measured})")
        for row in rows:
            state = {"firing": "[bold red]firing[/]", "ok": "[green]ok[/]"}.get(row.state, row.state)
            table.add_row(row.rule.name, row.rule.severity, row.series, _fmt(row.value), threshold(row.rule),
                          f"{row.rule.wait:g} s", state)
        console.print(table)
    firing = sorted({row.rule.name for row in rows if row.firing})
    if firing and not as_json:
        console.print(f"firing: {', '.join(firing)}" + (f" (posted to {webhook})" if webhook else ""),
                      highlight=False)
    if firing:
        raise typer.Exit(FIRING)


@monitor_app.command("drift")
def drift(db: Path = typer.Option(None, "--db", help=(
              "Feedback database (default: RUN/serve.feedback_db, else the workspace's).")),
          days: float = typer.Option(7.0, "--days", min=0, help=(
              "Look at the questions of the last DAYS days (0: all).")),
          max_distance: float = typer.Option(0.6, "--max-distance", min=0.01, max=2.0, help=(
              "Cosine distance under which questions count as one topic (lower: more, tighter topics).")),
          examples: int = typer.Option(3, "--examples", min=1, help="Example questions shown per topic."),
          as_json: bool = typer.Option(False, "--json", help="Print the topics as JSON instead of a table."),
          run: Path = RunOption, workspace: Path = WorkspaceOption) -> None:
    """Topics users ask about that the model could not answer: the questions it abstained on or that got a thumbs
    down, clustered by meaning, biggest first, with examples."""
    from tailor.config import CONFIG_NAME, RetrievalConfig
    from tailor.monitor.drift import drift_report
    from tailor.serve.feedback import read_answers

    retrieval = RetrievalConfig()  # a database given without a workspace: the default abstention and embedder
    if db is None or (workspace / CONFIG_NAME).is_file():
        config, root = open_workspace(workspace, [], required=False)
        retrieval = config.retrieval
        if db is None:
            run_dir = run_folder(root, run)
            db = (run_dir if run_dir.is_dir() else root) / config.serve.feedback_db
    answers = read_answers(db, time.time() - days * 86400 if days else None)
    topics = drift_report(answers, retrieval.abstain_answer, retrieval.embedding_model, max_distance, examples)
    if as_json:
        print(json.dumps([topic.as_json() for topic in topics], indent=2, ensure_ascii=False))
        return
    if not topics:
        console.print(f"no unanswered questions in {db} ({len(answers)} answers looked at)", highlight=False)
        return
    table = Table("topic", "questions", "abstained", "thumbs down", "models", "examples",
                  title=f"unanswered questions in {db}, last {days:g} days" if days else f"unanswered in {db}")
    for topic in topics:
        table.add_row(topic.label, str(topic.size), str(topic.abstained), str(topic.thumbs_down),
                      ", ".join(topic.models), "\n".join(topic.examples))
    console.print(table)
