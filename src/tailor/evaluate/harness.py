"""Evaluate several models side by side on the same eval sets: by default the base model and the run's customized
one; `eval.models` names any mix of base, run folders, exported folders and OpenAI-compatible endpoints.

Per model: the held-out questions (answer metrics, eval loss, rules), the classification sets, the probes; then the
judge scores every model's answers. Writes `eval/report.json` ({"models": {name: metrics}, "classification",
"judge", "probes"}), `eval/predictions.jsonl` (one row per model and question with its scores and broken rules, so
a bad row can be traced to its source line), `classification.jsonl`, `judge.jsonl`, `probes.jsonl` when those
ran, and the self-contained `eval/report.html`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tailor.config import TailorConfig
from tailor.errors import TailorError
from tailor.evaluate.grounding import GROUNDING_ROWS, answer_all, grounding_fields, grounding_metrics
from tailor.evaluate.metrics import bleu_signature, corpus_bleu, exact_match, rouge_l, sentence_bleu, token_f1
from tailor.evaluate.report import REPORT_HTML, extra_rows, write_html_report
from tailor.evaluate.rules import adherence, broken_rules
from tailor.evaluate.sources import ModelSpec, check_endpoint, open_model, parse_spec, resolve_specs
from tailor.models.base import pick_dtype, resolve_base_model
from tailor.workspace import now_iso, read_jsonl, update_manifest, write_json, write_jsonl

METRIC_ORDER = ("token_f1", "exact_match", "rouge_l", "bleu", "eval_loss", "perplexity")


META_KEYS = ("gold_source", "answerable")  # what a question may say about its answer beyond the text


def _eval_records(path: Path, limit: int) -> tuple[list[tuple[str, list[dict], str]], list[dict]]:
    """(source, conversation, reference) per held-out record, and what each says of its answer (META_KEYS)."""
    records, meta = [], []
    for line_no, record in read_jsonl(path):
        messages = record.get("messages")
        if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise TailorError(f"{path}:{line_no}: expected \"messages\" ending with an assistant answer")
        records.append((record.get("source", f"{path}:{line_no}"), messages[:-1], messages[-1]["content"]))
        meta.append({key: record[key] for key in META_KEYS if key in record})
    if not records:
        raise TailorError(f"{path}: no evaluation records")
    return (records[:limit], meta[:limit]) if limit else (records, meta)


@dataclass
class EvalPlan:
    """Everything an evaluation needs, read and checked before any model loads."""

    eval_path: Path
    records: list[tuple[str, list[dict], str]]
    specs: list[ModelSpec]
    customized: str  # the model a bare gate metric and the report's "worst answers" refer to
    sets: list = field(default_factory=list)
    judge: ModelSpec | None = None
    meta: list[dict] = field(default_factory=list)  # per record: gold_source, answerable


def customized_name(specs: list[ModelSpec], run_dir: Path) -> str:
    """This run's customized model if it is compared, else the last model that is not the base."""
    here = [s.name for s in specs if s.kind == "run" and Path(s.target).resolve() == Path(run_dir).resolve()]
    others = [s.name for s in specs if s.kind != "base"]
    return (here or others or [specs[-1].name])[-1]


def plan_eval(config: TailorConfig, root: Path, run_dir: Path, *, only_customized: bool = False) -> EvalPlan:
    """Read the eval files and resolve the models; bad input (a file in the wrong shape, a label outside its set, a
    missing folder, an unreachable endpoint) stops here with one line, before any model loads."""
    from tailor.evaluate.classification import load_sets

    run_dir = Path(run_dir)
    eval_path = run_dir / "data" / "eval.jsonl"
    if not eval_path.is_file():
        raise TailorError(f"{eval_path}: no evaluation data; run `tailor data build`")
    records, meta = _eval_records(eval_path, config.eval.limit)
    specs = resolve_specs(config, root, run_dir)
    names = [spec.name for spec in specs]
    if only_customized:
        specs = [s for s in specs if s.kind != "base"] or specs
    set_configs = config.eval.classification or _built_classification_set(run_dir)
    sets = load_sets(set_configs, root, config.eval.limit)
    judge_cfg = config.eval.judge
    judge = None
    if judge_cfg.model:
        judge = parse_spec("judge", judge_cfg.model, root=root, run_dir=run_dir, where="eval.judge.model")
        if judge_cfg.pairwise and judge_cfg.reference not in names:
            raise TailorError(f"eval.judge.reference: '{judge_cfg.reference}' is not one of the evaluated models "
                              f"({', '.join(names)})")
    for spec in [*specs, *([judge] if judge else [])]:
        if spec.kind == "endpoint":
            check_endpoint(spec)
    return EvalPlan(eval_path, records, specs, customized_name(specs, run_dir), sets, judge, meta)


def _built_classification_set(run_dir: Path) -> list:
    """Without eval.classification, the held-out split `tailor data build` made from data.classification_files."""
    from tailor.config import ClassificationSetConfig
    from tailor.workspace import read_json

    folder = Path(run_dir) / "data" / "classification"
    if not (folder / "eval.jsonl").is_file() or not (folder / "labels.json").is_file():
        return []
    labels = read_json(folder / "labels.json")
    if not isinstance(labels, list) or len(labels) < 2:
        return []
    return [ClassificationSetConfig(name="classification", file=str((folder / "eval.jsonl").resolve()),
                                    labels=[str(label) for label in labels])]


def run_eval(config: TailorConfig, root: Path, run_dir: Path, *, show_progress: bool = True,
             write_html: bool = True, only_customized: bool = False, plan: EvalPlan | None = None) -> dict:
    """Score every model side by side; `write_html=False` skips the HTML page (plots cost a second or two, which
    adds up over many hyperparameter-search trials); `only_customized` leaves out the base model (tune trials)."""
    from tailor.evaluate.classification import score_set
    from tailor.evaluate.probes import add_forgetting_drop, run_bias, run_forgetting

    run_dir = Path(run_dir)
    plan = plan or plan_eval(config, root, run_dir, only_customized=only_customized)
    records, eval_cfg = plan.records, config.eval
    base_ref = resolve_base_model(config.base_model, root=root)
    compute_dtype = pick_dtype(config.train.dtype)
    rules = eval_cfg.rules
    report: dict[str, Any]  # filled in stage by stage below
    report = {"created_at": now_iso(), "eval_file": str(plan.eval_path), "n_questions": len(records),
              "method": plan.customized, "bleu_signature": bleu_signature(),
              "rules": [rule.model_dump() for rule in rules],
              "sources": {s.name: {"kind": s.kind, "target": s.target, **({"model": s.remote_model}
                                                                          if s.remote_model else {})}
                          for s in plan.specs},
              "models": {}}
    predictions, class_rows, probe_rows, answers_by_model = [], [], [], {}
    classification: dict[str, dict] = {s.name: {} for s in plan.sets}
    probes: dict[str, dict] = {}
    notes: list[str] = []
    console = Console(file=sys.stderr)
    with Progress(TextColumn("[bold]{task.fields[what]} {task.fields[model]}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, disable=not show_progress, transient=True) as progress:
        for spec in plan.specs:
            task = progress.add_task("eval", total=len(records), model=spec.name, what="answering")
            started = time.perf_counter()
            with open_model(spec, config, base_ref, compute_dtype) as model:
                answers, seen, retrievals = answer_all(
                    model, [conv for _, conv, _ in records], max_new_tokens=eval_cfg.max_new_tokens,
                    batch_size=eval_cfg.batch_size, sentences=config.sentence_limit(),
                    on_batch=lambda n, task=task: progress.advance(task, n))
                loss = None
                if model.has_likelihood:  # on the conversations as the model saw them (passages included)
                    loss = model.answer_loss([(conv, ref) for conv, (_, _, ref) in zip(seen, records, strict=True)],
                                             batch_size=eval_cfg.batch_size)
                rows = _answer_rows(spec.name, records, answers, rules)
                gold_cache: dict = {}
                for row, meta, retrieval in zip(rows, plan.meta or [{}] * len(rows), retrievals, strict=True):
                    row.update(grounding_fields(row["prediction"], row["reference"], meta, retrieval,
                                                model.grounding, config.retrieval.abstain_answer, gold_cache))
                predictions += rows
                answers_by_model[spec.name] = answers
                report["models"][spec.name] = {
                    "token_f1": _mean(rows, "token_f1"),
                    "exact_match": _mean(rows, "exact_match"),
                    "rouge_l": _mean(rows, "rouge_l"),
                    # corpus BLEU, not the mean of the per-answer scores: n-gram counts are pooled before the mean
                    "bleu": round(corpus_bleu(answers, [reference for _, _, reference in records]), 4),
                    # an endpoint returns text only: no loss on the reference answers
                    "eval_loss": None if loss is None else round(loss, 4),
                    "perplexity": None if loss is None else round(math.exp(loss), 3) if loss < 50 else float("inf"),
                    **adherence(rules, [row["broken_rules"] for row in rows] if rules else []),
                    **grounding_metrics(rows),
                    "n": len(rows),
                }
                for dataset in plan.sets:
                    if not model.has_likelihood:
                        notes.append(f"{spec.name}: classification set '{dataset.name}' skipped (an endpoint "
                                     f"gives no label likelihoods)")
                        continue
                    progress.update(task, what=f"classifying {dataset.name}", completed=0,
                                    total=len(dataset.records))
                    metrics, rows = score_set(model, dataset, system_prompt=config.system_prompt,
                                              batch_size=eval_cfg.batch_size)
                    progress.update(task, completed=len(dataset.records))
                    classification[dataset.name][spec.name] = metrics
                    class_rows += rows
                if eval_cfg.probes:
                    probes[spec.name] = {}
                if "bias" in eval_cfg.probes:
                    progress.update(task, what="bias probe", completed=0, total=None)
                    probes[spec.name]["bias"], rows = run_bias(
                        model, system_prompt=config.system_prompt, max_new_tokens=min(eval_cfg.max_new_tokens, 24),
                        batch_size=eval_cfg.batch_size, limit=eval_cfg.limit)
                    probe_rows += [{"probe": "bias", **row} for row in rows]
                if "forgetting" in eval_cfg.probes:
                    if model.has_likelihood:
                        progress.update(task, what="forgetting probe", completed=0, total=None)
                        probes[spec.name]["forgetting"], rows = run_forgetting(
                            model, batch_size=eval_cfg.batch_size, limit=eval_cfg.limit)
                        probe_rows += [{"probe": "forgetting", **row} for row in rows]
                    else:
                        notes.append(f"{spec.name}: forgetting probe skipped (an endpoint gives no likelihoods)")
            report["models"][spec.name]["seconds"] = round(time.perf_counter() - started, 1)
            progress.remove_task(task)
        judge_rows: list[dict] = []
        if plan.judge is not None:
            report["judge"], judge_rows = _run_judge(plan.judge, config, records, answers_by_model, base_ref,
                                                     compute_dtype, progress)
    if plan.sets:
        report["classification"] = classification
    if probes:
        add_forgetting_drop(probes)
        report["probes"] = probes
    if notes:
        report["notes"] = notes
    if "base" in report["models"] and plan.customized in report["models"] and plan.customized != "base":
        tuned = report["models"][plan.customized]
        report["token_f1_gain"] = round(tuned["token_f1"] - report["models"]["base"]["token_f1"], 4)
    eval_dir = run_dir / "eval"
    write_jsonl(eval_dir / "predictions.jsonl", predictions)
    outputs = [eval_dir / "report.json"]
    for name, rows in (("classification.jsonl", class_rows), ("judge.jsonl", judge_rows),
                       ("probes.jsonl", probe_rows)):
        if rows:
            write_jsonl(eval_dir / name, rows)
            outputs.append(eval_dir / name)
        else:
            (eval_dir / name).unlink(missing_ok=True)  # one from an earlier eval would contradict report.json
    write_json(eval_dir / "report.json", report)
    if write_html:
        outputs.append(write_html_report(report, predictions, run_dir))
    else:
        (eval_dir / REPORT_HTML).unlink(missing_ok=True)  # a page from an earlier eval would contradict report.json
    update_manifest(run_dir, "eval", inputs=[plan.eval_path, *[s.path for s in plan.sets]], outputs=outputs,
                    metrics={f"{m}.{k}": v for m, vals in report["models"].items() for k, v in vals.items()
                             if k in METRIC_ORDER or k == "adherence"})
    return report


def _answer_rows(name: str, records, answers: list[str], rules) -> list[dict]:
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
    return rows


def _run_judge(spec: ModelSpec, config: TailorConfig, records, answers_by_model: dict[str, list[str]],
               base_ref: str, compute_dtype, progress) -> tuple[dict, list[dict]]:
    from tailor.evaluate.judge import pairwise, rubric_scores

    cfg = config.eval.judge
    shown = records[: cfg.limit] if cfg.limit else records
    result: dict[str, Any]
    result = {"judge": spec.name, "source": {"kind": spec.kind, "target": spec.target}, "rubric": cfg.rubric,
              "n": len(shown), "scores": {}, "pairwise": {}}
    rows = []
    task = progress.add_task("judge", total=len(answers_by_model), model=spec.name, what="judging with")
    with open_model(spec, config, base_ref, compute_dtype) as judge:
        for name, answers in answers_by_model.items():
            items = [{"question": conv[-1]["content"], "reference": ref, "answer": answer}
                     for (_, conv, ref), answer in zip(shown, answers, strict=False)]
            result["scores"][name], scored = rubric_scores(judge, items, cfg.rubric,
                                                           batch_size=config.eval.batch_size)
            rows += [{"model": name, "kind": "rubric", **row} for row in scored]
            if cfg.pairwise and name != cfg.reference and cfg.reference in answers_by_model:
                for item, other in zip(items, answers_by_model[cfg.reference], strict=False):
                    item["other"] = other
                result["pairwise"][name], compared = pairwise(judge, items, batch_size=config.eval.batch_size)
                rows += [{"model": name, "against": cfg.reference, "kind": "pairwise", **row} for row in compared]
            progress.advance(task)
    result["reference"] = cfg.reference if result["pairwise"] else None
    return result, rows


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
    rows += [(label, [report["models"][n].get(key) for n in names]) for label, key in GROUNDING_ROWS
             if any(report["models"][n].get(key) is not None for n in names)]
    rows += extra_rows(report)
    for label, values in rows:
        table.add_row(label, *["-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                               for v in values])
    if "token_f1_gain" in report:
        table.caption = f"token F1 gain over base: {report['token_f1_gain']:+.4f}"
    return table
