"""The search's outputs for people: a Rich table of trials and `RUN/tune/report.html` with Optuna's plots.

The page embeds plotly.js once, inline, so it opens offline like the evaluation report.
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from typing import Any

from rich.table import Table

from tailor.workspace import atomic_write_text, now_iso

REPORT_HTML = "report.html"


def metric_value(trial) -> str:
    """The objective as text; a pruned trial has none (Optuna stores its last intermediate eval loss there)."""
    return f"{trial.value:.4f}" if trial.state.name == "COMPLETE" else "-"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if not isinstance(value, str) else value


def trials_table(study, metric: str) -> Table:
    table = Table(title=f"Study '{study.study_name}' ({study.direction.name.lower()} {metric})")
    params = sorted({key for trial in study.trials for key in trial.params})
    for column in ("trial", "state", metric, *params, "steps", "seconds"):
        table.add_column(column, justify="left" if column in ("state", *params) else "right")
    best = _best_number(study)
    for trial in study.trials:
        row = [str(trial.number), trial.state.name.lower(), metric_value(trial),
               *[_fmt(trial.params.get(key)) for key in params],
               _fmt(trial.user_attrs.get("steps")), _fmt(trial.user_attrs.get("seconds"))]
        table.add_row(*row, style="bold green" if trial.number == best else None)
    return table


def _best_number(study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:  # no completed trial yet
        return None


def _figures(study) -> list[tuple[str, Any]]:
    """(title, plotly figure or a sentence saying why the plot is missing)."""
    import optuna
    import optuna.visualization as vis

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    params = {key for trial in completed for key in trial.params}
    figures: list[tuple[str, Any]] = [("Optimization history", vis.plot_optimization_history(study))]
    if any(trial.intermediate_values for trial in study.trials):
        figures.append(("Intermediate values (eval loss reported to the pruner; negated when maximizing)",
                        vis.plot_intermediate_values(study)))
    if len(params) >= 2 and len(completed) >= 3:
        try:
            figures.append(("Parameter importances", vis.plot_param_importances(study)))
        except (RuntimeError, ValueError) as exc:  # e.g. every completed trial scored the same
            figures.append(("Parameter importances", f"not computed: {exc}"))
    else:
        figures.append(("Parameter importances", "needs at least 2 searched parameters and 3 completed trials"))
    if completed:
        figures.append(("Parallel coordinates", vis.plot_parallel_coordinate(study)))
    return figures


def write_tune_report(study, tune_dir: Path, *, metric: str, direction: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks some plots experimental
        figures = _figures(study)
    sections, plotly_included = [], False
    for title, figure in figures:
        if isinstance(figure, str):
            body = f"<p class=note>{html.escape(figure)}</p>"
        else:
            # plotly.js inline in the first figure only: the page opens offline and stays one file
            body = figure.to_html(full_html=False, include_plotlyjs=not plotly_included)
            plotly_included = True
        sections.append(f"<section><h2>{html.escape(title)}</h2>{body}</section>")
    rows = []
    best = _best_number(study)
    for trial in study.trials:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        mark = " class=best" if trial.number == best else ""
        rows.append(f"<tr{mark}><td>{trial.number}</td><td>{trial.state.name.lower()}</td>"
                    f"<td>{metric_value(trial)}</td><td>{html.escape(params)}</td>"
                    f"<td>{_fmt(trial.user_attrs.get('steps'))}</td></tr>")
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>tailor tune: {html.escape(study.study_name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25rem .5rem}}tr.best{{background:#e6f4e6;font-weight:bold}}
.note{{color:#666}}</style></head><body>
<h1>Hyperparameter search: {html.escape(study.study_name)}</h1>
<p>{direction} <b>{html.escape(metric)}</b> over {len(study.trials)} trials; written {now_iso()}.</p>
{''.join(sections)}
<section><h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>{html.escape(metric)}</th><th>values</th>
<th>steps</th></tr>{''.join(rows)}</table></section>
</body></html>
"""
    path = Path(tune_dir) / REPORT_HTML
    atomic_write_text(path, page)
    return path
