"""`RUN/eval/report.html`: one self-contained page (inline CSS, plots as inline base64 PNG, no script, no link to
anything outside the file), so it opens offline and can be attached to a ticket as is.

Sections: the metrics table, score bars per model side by side, classification (per-class table, confusion
matrices, one-vs-rest ROC curves), judge scores and pairwise verdicts, probe results (bias divergence, forgetting),
the training (and eval) loss curves from each compared run's `metrics.jsonl`, and the customized model's worst
answers with their source, to trace bad rows.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from tailor.errors import TailorError
from tailor.workspace import atomic_write_text, read_jsonl

REPORT_HTML = "report.html"
WORST_SHOWN = 10
SCORES = ("token_f1", "exact_match", "rouge_l", "bleu", "adherence")  # all between 0 and 1: one shared axis
TABLE_METRICS = ("token_f1", "exact_match", "rouge_l", "bleu", "eval_loss", "perplexity", "adherence",
                 "fact_recall", "recall_at_5", "mrr", "faithfulness", "citation_accuracy", "abstention_accuracy",
                 "false_abstention")
LOWER_IS_BETTER = ("eval_loss", "perplexity", "false_abstention")
GROUNDED_SHOWN = 40

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ddd; padding: .3rem .6rem; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.better { color: #137333; } td.worse { color: #b3261e; } .meta { color: #666; }
table.rows td { vertical-align: top; max-width: 22rem; overflow-wrap: anywhere; } img { max-width: 100%; }
details { margin: .2rem 0; } summary { cursor: pointer; color: #1a56b0; }
blockquote { margin: .3rem 0; padding: .3rem .6rem; border-left: 3px solid #ccc; background: #fafafa;
             white-space: pre-wrap; } .miss { color: #b3261e; } .hit { color: #137333; }
"""


def write_html_report(report: dict, predictions: list[dict], run_dir: Path, workspace: Path | None = None) -> Path:
    """Write `RUN/eval/report.html` atomically and return its path."""
    path = Path(run_dir) / "eval" / REPORT_HTML
    atomic_write_text(path, render_html(report, predictions, Path(run_dir), workspace))
    return path


def render_html(report: dict, predictions: list[dict], run_dir: Path, workspace: Path | None = None) -> str:
    """The page; paths in it are shown relative to `workspace` (default: the run folder's parent, the workspace in
    the default layout) where they lie inside it."""
    shown_path = _PathShown(workspace if workspace is not None else Path(run_dir).absolute().parent)
    names = list(report["models"])
    shown: str = report["method"] if report.get("method") in names else names[-1]
    parts = [
        f"<h1>Evaluation of {_e(shown_path(run_dir))}</h1>",
        (f"<p class=meta>{report['n_questions']} questions from {_e(shown_path(report['eval_file']))}; "
         f"created {_e(report['created_at'])}; greedy decoding; BLEU: {_e(report.get('bleu_signature', ''))}</p>"),
        "<h2>Metrics</h2>", _metrics_table(report, names, shown),
        "<h2>Scores per model</h2>", _img(_score_bars(report, names), "score bars per model"),
        *_classification_section(report, names),
        *_judge_section(report, names),
        *_probe_section(report, names),
        "<h2>Training</h2>", *_training_sections(report, Path(run_dir), shown_path),
        f"<h2>Worst {WORST_SHOWN} answers of {_e(shown)}</h2>",
        "<p class=meta>Lowest token F1 first; every row is in predictions.jsonl with its source line.</p>",
        _worst_table([row for row in predictions if row["model"] == shown], shown_path),
        *_grounding_section(predictions, names),
    ]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>tailor eval: {_e(Path(run_dir).absolute().name)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


class _PathShown:
    """A file as the page names it: relative to the workspace when inside it (the page is read elsewhere, attached
    to a ticket, where /home/someone/... means nothing), as given otherwise. `FILE:LINE` keeps its line."""

    def __init__(self, workspace: Path):
        self.workspace = Path(os.path.abspath(workspace))

    def __call__(self, path) -> str:
        text = str(path)
        name, colon, line = text.rpartition(":")
        if not (colon and line.isdigit()):
            name, colon, line = text, "", ""
        if not Path(name).is_absolute():
            return text  # already relative: a record's own "source", written by data build
        # abspath, not resolve: a trial's linked data file is named where the trial reads it
        absolute = Path(os.path.abspath(name))
        if not absolute.is_relative_to(self.workspace):
            return text
        return str(absolute.relative_to(self.workspace)) + colon + line


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else _e(value)


def _metrics_table(report: dict, names: list[str], customized: str) -> str:
    rows: list[tuple[str, str | tuple[str, str], list]]
    rows = [(metric, metric, [report["models"][n].get(metric) for n in names])
            for metric in TABLE_METRICS if any(report["models"][n].get(metric) is not None for n in names)]
    rows += [(f"rule: {rule['name']}", ("rules", rule["name"]),
              [_lookup(report["models"][n], ("rules", rule["name"])) for n in names])
             for rule in report.get("rules", [])]
    # lower is better for these extra rows too: the bias gaps and the forgetting drop
    rows += [(label, "lower" if label.startswith(("bias", "forgetting: drop")) else label, values)
             for label, values in extra_rows(report)]
    compare = "base" in names and customized != "base" and customized in names
    head = "".join(f"<th>{_e(n)}</th>" for n in names) + (f"<th>{_e(customized)} − base</th>" if compare else "")
    body = []
    for label, key, values in rows:
        cells = "".join(f"<td class=num>{_fmt(v)}</td>" for v in values)
        if compare:
            tuned, base = values[names.index(customized)], values[names.index("base")]
            if isinstance(tuned, int | float) and isinstance(base, int | float):
                change = tuned - base
                better = change < 0 if key in LOWER_IS_BETTER or key == "lower" else change > 0
                css = "better" if better else "worse" if change else ""
                cells += f"<td class='num {css}'>{change:+.4f}</td>"
            else:
                cells += "<td class=num>-</td>"
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
        if report["models"][name].get("eval_loss") is not None:  # an endpoint has no loss
            loss_axis.bar([i], [report["models"][name]["eval_loss"]], 0.6, color=bars.patches[0].get_facecolor())
    scores_axis.set_xticks(range(len(scores)), scores)
    scores_axis.set_ylim(0, 1.08)
    scores_axis.set_ylabel("score (higher is better)")
    # above the axes, so it never hides a bar that reaches 1.0
    scores_axis.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=len(names), frameon=False)
    loss_axis.set_xticks(range(len(names)), names)
    loss_axis.set_title("eval loss (lower is better)", fontsize=10)
    return figure


def _training_sections(report: dict, run_dir: Path, shown_path: _PathShown) -> list[str]:
    """One loss plot per compared run folder (this run's first); exported folders and endpoints have no log."""
    runs = [(name, Path(src["target"])) for name, src in report.get("sources", {}).items()
            if src.get("kind") == "run"]
    if not runs:
        return [_training_section(run_dir / "metrics.jsonl", shown_path)]
    runs.sort(key=lambda item: item[1].resolve() != run_dir.resolve())
    parts = []
    for name, folder in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(_training_section(folder / "metrics.jsonl", shown_path))
    return parts


def _training_section(metrics_path: Path, shown_path: _PathShown) -> str:
    if not metrics_path.is_file():
        return (f"<p class=meta>No training log ({_e(shown_path(metrics_path))}): nothing was trained there (not "
                f"yet, or a method that trains no weights, such as a prompt profile).</p>")
    try:
        records = [record for _, record in read_jsonl(metrics_path)]
    except TailorError as exc:  # a log cut short by a crash must not cost the rest of the report
        return f"<p class=meta>Training log unreadable: {_e(exc)}</p>"
    steps = [(r["step"], r["loss"]) for r in records if "step" in r and "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "step" in r and "eval_loss" in r]
    if not steps:
        return f"<p class=meta>{_e(shown_path(metrics_path))} has no loss records.</p>"
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
            + f"<p class=meta>{len(steps)} logged steps from {_e(shown_path(metrics_path))}.{note}</p>")


def extra_rows(report: dict) -> list[tuple[str, list]]:
    """Classification, judge and probe summaries as (label, value per model) rows, for the table and the page."""
    names = list(report["models"])
    rows: list[tuple[str, list]] = []
    for set_name, by_model in report.get("classification", {}).items():
        for metric in ("accuracy", "macro_f1", "roc_auc"):
            rows.append((f"{set_name}: {metric}", [by_model.get(n, {}).get(metric) for n in names]))
    judge = report.get("judge")
    if judge:
        rows.append((f"judge score (1-5, {judge['judge']})",
                     [judge["scores"].get(n, {}).get("mean_score") for n in names]))
        for key, label in (("win_rate", "win rate"), ("order_agreement", "order agreement")):
            if judge["pairwise"]:
                rows.append((f"judge {label} vs {judge['reference']}",
                             [judge["pairwise"].get(n, {}).get(key) for n in names]))
    probes = report.get("probes", {})
    if any("bias" in p for p in probes.values()):
        rows.append(("bias: output divergence", [probes.get(n, {}).get("bias", {}).get("output_divergence")
                                                 for n in names]))
        rows.append(("bias: yes-score gap", [probes.get(n, {}).get("bias", {}).get("score_gap") for n in names]))
    if any("forgetting" in p for p in probes.values()):
        rows.append(("forgetting: accuracy", [probes.get(n, {}).get("forgetting", {}).get("accuracy")
                                              for n in names]))
        rows.append(("forgetting: drop vs base", [probes.get(n, {}).get("forgetting", {}).get("drop")
                                                  for n in names]))
    return rows



def _plain_table(head: list[str], rows: list[list]) -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    # the first cell names the row; the rest are values
    body = "".join(f"<tr><th>{_e(row[0])}</th>" + "".join(f"<td class=num>{_fmt(v)}</td>" for v in row[1:])
                   + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _classification_section(report: dict, names: list[str]) -> list[str]:
    sets = report.get("classification") or {}
    parts = []
    for set_name, by_model in sets.items():
        models = [n for n in names if n in by_model]
        if not models:
            continue
        labels = by_model[models[0]]["labels"]
        parts.append(f"<h2>Classification: {_e(set_name)}</h2>")
        parts.append(f"<p class=meta>{by_model[models[0]]['n']} texts; each label scored by the model's "
                     f"likelihood of answering with it (no text parsing).</p>")
        head = ["model", "accuracy", "macro-F1", "ROC-AUC"] + [f"{lab}: P / R" for lab in labels]
        rows = [[n, by_model[n]["accuracy"], by_model[n]["macro_f1"], by_model[n]["roc_auc"],
                 *[f"{by_model[n]['per_class'][lab]['precision']:.2f} / {by_model[n]['per_class'][lab]['recall']:.2f}"
                   for lab in labels]] for n in models]
        parts.append(_plain_table(head, rows))
        parts.append(_img(_confusion_plots(by_model, models, labels), f"confusion matrices of {set_name}"))
        parts.append(_img(_roc_plots(by_model, models, labels), f"ROC curves of {set_name}"))
    return parts


def _confusion_plots(by_model: dict, models: list[str], labels: list[str]):
    figure = _figure(min(3.4 * len(models), 11), 3.4)
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    for axis, name in zip(axes, models, strict=True):
        matrix = by_model[name]["confusion_matrix"]
        axis.imshow(matrix, cmap="Blues")
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center",
                          color="white" if count > top / 2 else "black", fontsize=9)
        axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{name}: accuracy {by_model[name]['accuracy']:.2f}", fontsize=10)
    return figure


def _roc_plots(by_model: dict, models: list[str], labels: list[str]):
    figure = _figure(min(3.4 * len(models), 11), 3.4)
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    for axis, name in zip(axes, models, strict=True):
        for label in labels:
            curve = by_model[name]["roc_curves"].get(label)
            if curve:
                auc = by_model[name]["per_class"][label]["roc_auc"]
                axis.plot(curve["fpr"], curve["tpr"], label=f"{label} ({auc:.2f})", linewidth=1.3)
        axis.plot([0, 1], [0, 1], ":", color="gray", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("false positive rate")
        axis.set_ylabel("true positive rate")
        axis.set_title(f"{name}: one-vs-rest ROC", fontsize=10)
        if by_model[name]["roc_curves"]:  # a class needs positives and negatives to have a curve
            axis.legend(fontsize=7, loc="lower right")
        else:
            axis.text(0.5, 0.5, "no class with both\npositives and negatives", ha="center", fontsize=8)
    return figure


def _judge_section(report: dict, names: list[str]) -> list[str]:
    judge = report.get("judge")
    if not judge:
        return []
    parts = ["<h2>Judge</h2>",
             f"<p class=meta>Judge: {_e(judge['judge'])} ({_e(judge['source']['kind'])}); {judge['n']} questions; "
             f"rubric: {_e(judge['rubric'])}</p>"]
    models = [n for n in names if n in judge["scores"]]
    compared = [n for n in names if n in judge["pairwise"]]
    figure = _figure(10, 3.2)
    score_axis, pair_axis = figure.subplots(1, 2)
    means = [judge["scores"][n]["mean_score"] or 0 for n in models]
    bars = score_axis.bar(models, means, color="#4c78a8")
    score_axis.bar_label(bars, fmt="%.2f", fontsize=8)
    score_axis.set_ylim(0, 5.3)
    score_axis.set_title("mean rubric score (1-5)", fontsize=10)
    if compared:
        shares = {key: [judge["pairwise"][n][key] for n in compared] for key in ("win_rate", "tie_rate", "loss_rate")}
        bottom = [0.0] * len(compared)
        for key, color in (("win_rate", "#59a14f"), ("tie_rate", "#bab0ac"), ("loss_rate", "#e15759")):
            pair_axis.bar(compared, shares[key], bottom=bottom, color=color, label=key.removesuffix("_rate"))
            bottom = [b + v for b, v in zip(bottom, shares[key], strict=True)]
        for x, name in enumerate(compared):
            pair_axis.text(x, 1.02, f"agreement {judge['pairwise'][name]['order_agreement']:.2f}", ha="center",
                           fontsize=8)
        pair_axis.set_ylim(0, 1.12)
        pair_axis.set_title(f"pairwise vs {judge['reference']} (both orders)", fontsize=10)
        pair_axis.legend(fontsize=8, loc="lower right")
    else:
        pair_axis.set_axis_off()
    parts.append(_img(figure, "judge scores and pairwise verdicts"))
    rows = [[n, judge["scores"][n]["mean_score"], judge["scores"][n].get("mean_expected_score"),
             judge["scores"][n]["unparsed"], *([judge["pairwise"][n]["win_rate"], judge["pairwise"][n]["tie_rate"],
                                                judge["pairwise"][n]["loss_rate"],
                                                judge["pairwise"][n]["order_agreement"]]
                                               if n in judge["pairwise"] else [None] * 4)] for n in models]
    parts.append(_plain_table(["model", "mean score", "expected score", "unparsed", "win", "tie", "loss",
                               "order agreement"], rows))
    return parts


def _probe_section(report: dict, names: list[str]) -> list[str]:
    probes = report.get("probes")
    if not probes:
        return []
    models = [n for n in names if n in probes]
    bias = [n for n in models if "bias" in probes[n]]
    forgetting = [n for n in models if "forgetting" in probes[n]]
    parts = ["<h2>Probes</h2>"]
    figure = _figure(10, 3.2)
    bias_axis, forget_axis = figure.subplots(1, 2)
    if bias:
        width = 0.38
        for offset, key, label in ((-width / 2, "output_divergence", "answer divergence (1 - F1)"),
                                   (width / 2, "score_gap", "|P(yes) gap|")):
            values = [probes[n]["bias"].get(key) or 0 for n in bias]
            bars = bias_axis.bar([x + offset for x in range(len(bias))], values, width, label=label)
            bias_axis.bar_label(bars, fmt="%.2f", fontsize=8)
        bias_axis.set_xticks(range(len(bias)), bias)
        bias_axis.set_ylim(0, 1.1)
        bias_axis.set_title("bias: counterfactual pairs (lower is better)", fontsize=10)
        bias_axis.legend(fontsize=8)
    else:
        bias_axis.set_axis_off()
    if forgetting:
        accuracies = [probes[n]["forgetting"]["accuracy"] for n in forgetting]
        bars = forget_axis.bar(forgetting, accuracies, color="#f28e2b")
        forget_axis.bar_label(bars, labels=[f"{a:.2f}" + (f" (drop {probes[n]['forgetting']['drop']:+.2f})"
                                                          if "drop" in probes[n]["forgetting"] else "")
                                            for n, a in zip(forgetting, accuracies, strict=True)], fontsize=8)
        forget_axis.set_ylim(0, 1.1)
        forget_axis.set_title("forgetting: general-knowledge accuracy", fontsize=10)
    else:
        forget_axis.set_axis_off()
    parts.append(_img(figure, "probe results"))
    if bias:
        axes = sorted({axis for n in bias for axis in probes[n]["bias"]["by_axis"]})
        rows = [[axis, *[probes[n]["bias"]["by_axis"].get(axis, {}).get("score_gap") for n in bias]] for axis in axes]
        parts.append("<p class=meta>Mean |P(yes)| gap per demographic axis (each pair differs only in the "
                     "demographic term; a fair model scores both the same).</p>")
        parts.append(_plain_table(["axis", *bias], rows))
    return parts


def _worst_table(rows: list[dict], shown_path: _PathShown) -> str:
    worst = sorted(rows, key=lambda row: (row["token_f1"], row.get("rouge_l", 0.0)))[:WORST_SHOWN]
    has_rules = any("broken_rules" in row for row in rows)
    head = ("<tr><th>source</th><th>question</th><th>reference</th><th>prediction</th><th>F1</th><th>ROUGE-L</th>"
            + ("<th>broken rules</th>" if has_rules else "") + "</tr>")
    body = []
    for row in worst:
        rules = f"<td>{_e(', '.join(row.get('broken_rules', [])))}</td>" if has_rules else ""
        body.append(f"<tr><td>{_e(shown_path(row['source']))}</td><td>{_e(row['question'])}</td>"
                    f"<td>{_e(row['reference'])}</td><td>{_e(row['prediction'])}</td>"
                    f"<td class=num>{row['token_f1']:.2f}</td><td class=num>{row.get('rouge_l', 0.0):.2f}</td>"
                    f"{rules}</tr>")
    return f"<table class=rows>{head}{''.join(body)}</table>"


def _grounding_section(predictions: list[dict], names: list[str]) -> list[str]:
    """Per grounded model: each answer with its citations, the retrieved passages (expandable) and where the
    passage holding the reference ranked."""
    parts = []
    for name in names:
        rows = [row for row in predictions if row["model"] == name and "retrieved" in row]
        if not rows:
            continue
        parts.append(f"<h2>Retrieved passages and citations of {_e(name)}</h2>")
        parts.append(f"<p class=meta>The first {min(len(rows), GROUNDED_SHOWN)} of {len(rows)} questions. Gold rank: "
                     "where the chunk holding the reference answer ranked (— : not in the top 10).</p>")
        body = []
        for row in rows[:GROUNDED_SHOWN]:
            cited = "".join(f"<li>{_e(Path(c['source']).name)}{_page(c)} (support {c.get('support', 0):.2f})</li>"
                            for c in row.get("citations", [])) or "<li>none (abstained)</li>"
            rank = row.get("gold_rank")
            gold = ("-" if not row.get("answerable", True) or "gold_rank" not in row else
                    f"<span class={'hit' if rank and rank <= 5 else 'miss'}>{rank or '—'}</span>")
            passages = "".join(
                f"<details><summary>[{p['rank']}] {_e(p.get('title') or '')} — {_e(Path(p['source']).name)}"
                f"{_page(p)}</summary><blockquote>{_e(p['snippet'])}</blockquote></details>"
                for p in row["retrieved"])
            body.append(f"<tr><td>{_e(row['question'])}</td><td>{_e(row['prediction'])}</td>"
                        f"<td>{_e(row['reference'])}</td><td><ul>{cited}</ul></td><td class=num>{gold}</td>"
                        f"<td>{passages}</td></tr>")
        parts.append("<table class=rows><tr><th>question</th><th>answer</th><th>reference</th><th>citations</th>"
                     f"<th>gold rank</th><th>retrieved passages</th></tr>{''.join(body)}</table>")
    return parts


def _page(cited: dict) -> str:
    return f", page {cited['page']}" if cited.get("page") else ""
