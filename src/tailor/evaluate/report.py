"""`RUN/eval/report.html`: one self-contained page (inline CSS, plots as inline base64 PNG, no script, no link to
anything outside the file), so it opens offline and can be attached to a ticket as is.

Sections: the metrics table, score bars per model side by side, the training (and eval) loss curves from
`RUN/metrics.jsonl`, and the customized model's worst answers with their source, to trace bad rows.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import atomic_write_text, read_jsonl

REPORT_HTML = "report.html"
WORST_SHOWN = 10
SCORES = ("token_f1", "exact_match", "rouge_l", "bleu", "adherence")  # all between 0 and 1: one shared axis
TABLE_METRICS = ("token_f1", "exact_match", "rouge_l", "bleu", "eval_loss", "perplexity", "adherence")
LOWER_IS_BETTER = ("eval_loss", "perplexity")

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ddd; padding: .3rem .6rem; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: #137333; } td.worse { color: #b3261e; } .meta { color: #666; }
table.rows td { vertical-align: top; max-width: 22rem; overflow-wrap: anywhere; } img { max-width: 100%; }
"""


def write_html_report(report: dict, predictions: list[dict], run_dir: Path) -> Path:
    """Write `RUN/eval/report.html` atomically and return its path."""
    path = Path(run_dir) / "eval" / REPORT_HTML
    atomic_write_text(path, render_html(report, predictions, Path(run_dir)))
    return path


def render_html(report: dict, predictions: list[dict], run_dir: Path) -> str:
    run_dir = run_dir.resolve()
    names = list(report["models"])
    shown = report.get("method") if report.get("method") in names else names[-1]
    parts = [
        f"<h1>Evaluation of {_e(str(run_dir))}</h1>",
        (f"<p class=meta>{report['n_questions']} questions from {_e(report['eval_file'])}; "
         f"created {_e(report['created_at'])}; greedy decoding; BLEU: {_e(report.get('bleu_signature', ''))}</p>"),
        "<h2>Metrics</h2>", _metrics_table(report, names, shown),
        "<h2>Scores per model</h2>", _img(_score_bars(report, names), "score bars per model"),
        "<h2>Training</h2>", _training_section(run_dir / "metrics.jsonl"),
        f"<h2>Worst {WORST_SHOWN} answers of {_e(shown)}</h2>",
        "<p class=meta>Lowest token F1 first; every row is in predictions.jsonl with its source line.</p>",
        _worst_table([row for row in predictions if row["model"] == shown]),
    ]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>tailor eval: {_e(run_dir.name)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else _e(value)


def _metrics_table(report: dict, names: list[str], customized: str) -> str:
    rows = [(metric, metric) for metric in TABLE_METRICS if metric in report["models"][names[0]]]
    rows += [(f"rule: {rule['name']}", ("rules", rule["name"])) for rule in report.get("rules", [])]
    compare = "base" in names and customized != "base"
    head = "".join(f"<th>{_e(n)}</th>" for n in names) + (f"<th>{_e(customized)} − base</th>" if compare else "")
    body = []
    for label, key in rows:
        values = [_lookup(report["models"][n], key) for n in names]
        cells = "".join(f"<td class=num>{_fmt(v)}</td>" for v in values)
        if compare:
            change = values[names.index(customized)] - values[names.index("base")]
            better = change < 0 if key in LOWER_IS_BETTER else change > 0
            css = "better" if better else "worse" if change else ""
            cells += f"<td class='num {css}'>{change:+.4f}</td>"
        body.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _lookup(metrics: dict, key):
    return metrics[key[0]][key[1]] if isinstance(key, tuple) else metrics[key]


def _figure(width: float, height: float):
    # the Agg canvas directly, not pyplot: no global backend state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _img(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version string or URL in the file
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{_e(alt)}' src=\"data:image/png;base64,{data}\">"


def _score_bars(report: dict, names: list[str]):
    """Grouped bars: one group per score (0-1), one bar per model; eval loss beside it on its own scale."""
    scores = [s for s in SCORES if s in report["models"][names[0]]]
    figure = _figure(10, 3.6)
    scores_axis, loss_axis = figure.subplots(1, 2, width_ratios=[4, 1])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        positions = [x + (i - (len(names) - 1) / 2) * width for x in range(len(scores))]
        bars = scores_axis.bar(positions, [report["models"][name][s] for s in scores], width, label=name)
        scores_axis.bar_label(bars, fmt="%.2f", fontsize=8)
        loss_axis.bar([i], [report["models"][name]["eval_loss"]], 0.6, color=bars.patches[0].get_facecolor())
    scores_axis.set_xticks(range(len(scores)), scores)
    scores_axis.set_ylim(0, 1.08)
    scores_axis.set_ylabel("score (higher is better)")
    # above the axes, so it never hides a bar that reaches 1.0
    scores_axis.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=len(names), frameon=False)
    loss_axis.set_xticks(range(len(names)), names)
    loss_axis.set_title("eval loss (lower is better)", fontsize=10)
    return figure


def _training_section(metrics_path: Path) -> str:
    if not metrics_path.is_file():
        return f"<p class=meta>No training log ({_e(metrics_path)}): the run has not been trained.</p>"
    try:
        records = [record for _, record in read_jsonl(metrics_path)]
    except TailorError as exc:  # a log cut short by a crash must not cost the rest of the report
        return f"<p class=meta>Training log unreadable: {_e(exc)}</p>"
    steps = [(r["step"], r["loss"]) for r in records if "step" in r and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "step" in r and "eval_loss" in r]
    if not steps:
        return f"<p class=meta>{_e(metrics_path)} has no loss records.</p>"
    figure = _figure(10, 3.4)
    axis = figure.subplots()
    axis.plot(*zip(*steps, strict=True), label="training loss", linewidth=1.2)
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.2)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats per answer token)")
    axis.legend()
    axis.grid(alpha=0.3)
    note = "" if evals else " No eval loss during training (train.eval_every is 0)."
    return (_img(figure, "training and eval loss by step")
            + f"<p class=meta>{len(steps)} logged steps from {_e(metrics_path)}.{note}</p>")


def _worst_table(rows: list[dict]) -> str:
    worst = sorted(rows, key=lambda row: (row["token_f1"], row.get("rouge_l", 0.0)))[:WORST_SHOWN]
    has_rules = any("broken_rules" in row for row in rows)
    head = ("<tr><th>source</th><th>question</th><th>reference</th><th>prediction</th><th>F1</th><th>ROUGE-L</th>"
            + ("<th>broken rules</th>" if has_rules else "") + "</tr>")
    body = []
    for row in worst:
        rules = f"<td>{_e(', '.join(row.get('broken_rules', [])))}</td>" if has_rules else ""
        body.append(f"<tr><td>{_e(row['source'])}</td><td>{_e(row['question'])}</td>"
                    f"<td>{_e(row['reference'])}</td><td>{_e(row['prediction'])}</td>"
                    f"<td class=num>{row['token_f1']:.2f}</td><td class=num>{row.get('rouge_l', 0.0):.2f}</td>"
                    f"{rules}</tr>")
    return f"<table class=rows>{head}{''.join(body)}</table>"
