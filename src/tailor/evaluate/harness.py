"""Evaluate the base model and the run's customized model on the same held-out chat records, side by side.

Writes `eval/report.json` ({"models": {name: metrics}}), `eval/predictions.jsonl` (one row per model and
question with its scores and broken rules, so a bad row can be traced to its source line) and the self-contained
`eval/report.html`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.evaluate.generate import greedy_answers
from tailor.evaluate.metrics import bleu_signature, corpus_bleu, exact_match, rouge_l, sentence_bleu, token_f1
from tailor.evaluate.report import REPORT_HTML, write_html_report
from tailor.evaluate.rules import adherence, broken_rules
from tailor.methods.artifacts import load_for_inference
from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model
from tailor.train.examples import tokenize_chat
from tailor.train.loop import evaluate_loss
from tailor.train.run import load_chat_examples
from tailor.workspace import now_iso, read_jsonl, update_manifest, write_json, write_jsonl

METRIC_ORDER = ("token_f1", "exact_match", "rouge_l", "bleu", "eval_loss", "perplexity")


def _eval_records(path: Path, limit: int) -> list[tuple[str, list[dict], str]]:
    records = []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise TailorError(f"{path}:{line_no}: expected \"messages\" ending with an assistant answer")
        records.append((record.get("source", f"{path}:{line_no}"), messages[:-1], messages[-1]["content"]))
    if not records:
        raise TailorError(f"{path}: no evaluation records")
    return records[:limit] if limit else records


def run_eval(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True,
             write_html: bool = True) -> dict:
    """Score every model of the run; `write_html=False` skips the HTML page (plots cost a second or two, which
    adds up over many hyperparameter-search trials)."""
    run_dir = Path(run_dir)
    eval_path = run_dir / "data" / "eval.jsonl"
    records = _eval_records(eval_path, config.eval.limit)
    base_ref = resolve_base_model(config.base_model, root=root)
    tokenizer = load_tokenizer(base_ref)
    compute_dtype = pick_dtype(config.train.dtype)
    models = load_for_inference(config, run_dir, base_ref, compute_dtype)

    examples = load_chat_examples(eval_path, tokenizer)
    if config.eval.limit:
        examples = examples[: config.eval.limit]
    rules = config.eval.rules
    report = {"created_at": now_iso(), "eval_file": str(eval_path), "n_questions": len(records),
              "method": models.method, "bleu_signature": bleu_signature(),
              "rules": [rule.model_dump() for rule in rules], "models": {}}
    predictions = []
    console = Console(file=sys.stderr)
    with Progress(TextColumn("[bold]evaluating {task.fields[model]}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, disable=not show_progress, transient=True) as progress:
        for name in models.names:
            task = progress.add_task("eval", total=len(records), model=name)
            started = time.perf_counter()
            conversations = [models.messages_for(name, conv) for _, conv, _ in records]
            loss_examples = examples
            if name == models.method and models.profile is not None:
                # the profile added example turns: they are context, the loss is on the real answer only
                loss_examples = [tokenize_chat(tokenizer, [*conv, {"role": "assistant", "content": reference}],
                                               where=source, last_turn_only=True)
                                 for (source, _, reference), conv in zip(records, conversations, strict=True)]
            with models.use(name) as model:
                answers = greedy_answers(model, tokenizer, conversations,
                                         max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                                         compute_dtype=compute_dtype,
                                         on_batch=lambda n, task=task: progress.advance(task, n))
                loss = evaluate_loss(model, loss_examples, batch_size=config.eval.batch_size,
                                     pad_id=tokenizer.pad_token_id, compute_dtype=compute_dtype)
            rows = []
            for (source, conv, reference), answer in zip(records, answers, strict=True):
                rows.append({"model": name, "source": source, "question": conv[-1]["content"],
                             "reference": reference, "prediction": answer,
                             "token_f1": round(token_f1(answer, reference), 4),
                             "exact_match": exact_match(answer, reference),
                             "rouge_l": round(rouge_l(answer, reference), 4),
                             "bleu": round(sentence_bleu(answer, reference), 4)})
                if rules:
                    rows[-1]["broken_rules"] = broken_rules(rules, answer)
            predictions += rows
            report["models"][name] = {
                "token_f1": _mean(rows, "token_f1"),
                "exact_match": _mean(rows, "exact_match"),
                "rouge_l": _mean(rows, "rouge_l"),
                # corpus BLEU, not the mean of the per-answer scores: n-gram counts are pooled before the mean
                "bleu": round(corpus_bleu(answers, [reference for _, _, reference in records]), 4),
                "eval_loss": round(loss, 4),
                "perplexity": round(math.exp(loss), 3) if loss < 50 else float("inf"),
                **adherence(rules, [row["broken_rules"] for row in rows] if rules else []),
                "n": len(rows),
                "seconds": round(time.perf_counter() - started, 1),
            }
    if len(report["models"]) > 1:
        tuned = report["models"][models.method]
        report["token_f1_gain"] = round(tuned["token_f1"] - report["models"]["base"]["token_f1"], 4)
    eval_dir = run_dir / "eval"
    write_jsonl(eval_dir / "predictions.jsonl", predictions)
    write_json(eval_dir / "report.json", report)
    outputs = [eval_dir / "report.json"]
    if write_html:
        outputs.append(write_html_report(report, predictions, run_dir))
    else:
        (eval_dir / REPORT_HTML).unlink(missing_ok=True)  # a page from an earlier eval would contradict report.json
    update_manifest(run_dir, "eval", inputs=[eval_path], outputs=outputs,
                    metrics={f"{m}.{k}": v for m, vals in report["models"].items() for k, v in vals.items()
                             if k in METRIC_ORDER or k == "adherence"})
    return report


def _mean(rows: list[dict], key: str) -> float:
    return round(sum(row[key] for row in rows) / len(rows), 4)


def report_table(report: dict) -> Table:
    table = Table(title=f"Held-out evaluation ({report['n_questions']} questions)")
    table.add_column("metric")
    names = list(report["models"])
    for name in names:
        table.add_column(name, justify="right")
    rows = [(metric, [report["models"][n][metric] for n in names]) for metric in METRIC_ORDER]
    if report.get("rules"):
        rows.append(("adherence", [report["models"][n]["adherence"] for n in names]))
        rows += [(f"  rule {rule['name']}", [report["models"][n]["rules"][rule["name"]] for n in names])
                 for rule in report["rules"]]
    for label, values in rows:
        table.add_row(label, *[f"{v:.4f}" if isinstance(v, float) else str(v) for v in values])
    if "token_f1_gain" in report:
        table.caption = f"token F1 gain over base: {report['token_f1_gain']:+.4f}"
    return table
