"""`tailor compare`: several methods trained (or built) on the same run data and evaluated on the same questions,
in one table ordered cheapest first — quality, training time, trainable parameters, artifact size, latency.

Each method gets its own run folder RUN/compare/<method>/ whose inputs are links to RUN's (no copies), so the
runs stay inspectable (`tailor eval -r RUN/compare/lora`) and a rerun replaces one method's folder only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from rich.table import Table

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, open_workspace, run_folder
from tailor.config import TailorConfig, apply_overrides, validate_config
from tailor.errors import TailorError
from tailor.workspace import derive_run_folder

COMPARE_DIR = "compare"


@dataclass
class CompareRow:
    method: str
    token_f1: float
    exact_match: float
    eval_loss: float
    train_seconds: float
    trainable_params: int
    artifact_bytes: int
    latency_ms: float  # mean wall time of one greedy answer, questions one at a time
    steps: int = 0
    run_dir: str = ""
    fact_recall: float | None = None
    recall_at_5: float | None = None  # grounded models: retrieval and citations
    citation_accuracy: float | None = None


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """KEY=VALUE for every method, and METHOD:KEY=VALUE for one (e.g. full:train.learning_rate=5e-5: a whole-model
    update needs a far smaller step than an adapter)."""
    common: list[str] = []
    per_method: dict[str, list[str]] = {}
    for item in overrides:
        key = item.partition("=")[0]
        if ":" in key.partition(".")[0]:
            method, _, rest = item.partition(":")
            per_method.setdefault(method.strip(), []).append(rest)
        else:
            common.append(item)
    return common, per_method


GROUNDED_SUFFIX = "+rag"  # "lora+rag": the method trained and evaluated with retrieval.enabled


def method_name(name: str) -> str:
    """The registered method behind a compared name ("lora+rag" -> "lora")."""
    return name.removesuffix(GROUNDED_SUFFIX)


def method_config(config: TailorConfig, name: str, overrides: Sequence[str] = ()) -> TailorConfig:
    grounded = ["retrieval.enabled=true"] if name.endswith(GROUNDED_SUFFIX) else []
    return validate_config(apply_overrides(config.model_dump(mode="json"),
                                           [f"train.method={method_name(name)}", *grounded, *overrides]),
                           source=f"tailor compare ({name})")


def answer_latency_ms(config: TailorConfig, root: Path, method_dir: Path, questions: list[list[dict]],
                      name: str) -> float:
    """Mean milliseconds per greedy answer of model `name` ("base" or the method), one question at a time; a
    grounded model's time includes its retrieval."""
    from tailor.evaluate.grounding import answer_all
    from tailor.evaluate.sources import LocalModel
    from tailor.methods.artifacts import load_for_inference
    from tailor.models.base import load_tokenizer, pick_dtype, resolve_base_model

    base_ref = resolve_base_model(config.base_model, root=root)
    dtype = pick_dtype(config.train.dtype)
    models = load_for_inference(config, method_dir, base_ref, dtype, own_tokenizers=True)
    tokenizer = models.tokenizer_for(name, load_tokenizer(base_ref))
    timings = []
    with models.use(name) as model:
        local = LocalModel(name, model, tokenizer, dtype, transform=lambda m: models.messages_for(name, m),
                           grounding=models.grounding if name != "base" else None)
        for conversation in questions:
            started = time.perf_counter()
            answer_all(local, [conversation], max_new_tokens=config.eval.max_new_tokens, batch_size=1,
                       sentences=config.sentence_limit())
            timings.append((time.perf_counter() - started) * 1000)
    return round(statistics.mean(timings), 1)


def eval_questions(eval_path: Path, count: int) -> list[list[dict]]:
    from tailor.workspace import read_jsonl

    questions = []
    for _, record in read_jsonl(eval_path):
        messages = record.get("messages") or []
        questions.append(messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages)
        if len(questions) == count:
            break
    return questions


def check_methods(names: list[str]) -> None:
    """Every name known, trainable through the run's data, and evaluable: before any model loads."""
    from tailor.methods import registry
    from tailor.methods.kinds import get_kind

    if not names:
        raise TailorError("--methods: name at least one method, e.g. --methods prompt,lora")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise TailorError(f"--methods: {', '.join(repeated)} listed twice")
    for name in names:
        method = registry.get(method_name(name), key="--methods")
        kind = get_kind(method.artifact)
        if not kind.generates:
            raise TailorError(f"--methods: {name} does not produce a chat model to evaluate "
                              f"(its artifact is {kind.summary})")


def run_compare(config: TailorConfig, root: Path, run_dir: Path, names: list[str], *, show_progress: bool = True,
                latency_questions: int = 5, method_overrides: dict[str, list[str]] | None = None,
                keep_going: bool = False) -> dict:
    """Train/build and evaluate each method in RUN/compare/<method>/; writes and returns RUN/compare/compare.json.

    `keep_going`: a method that fails is recorded under "failed" (its one-line reason) and the next one runs, so
    one broken method does not cost a long comparison the others."""
    from tailor.evaluate.harness import run_eval
    from tailor.methods import registry
    from tailor.methods.artifacts import artifact_dir
    from tailor.train.run import BuildResult, run_training
    from tailor.workspace import now_iso, write_json

    run_dir = Path(run_dir)
    check_methods(names)
    method_overrides = method_overrides or {}
    unknown = sorted(set(method_overrides) - set(names))
    if unknown:
        raise TailorError(f"override '{unknown[0]}:…': {unknown[0]} is not among --methods ({', '.join(names)})")
    # bad method options stop here, before any model loads
    from tailor.retrieval.grounding import index_folder
    from tailor.retrieval.index import INDEX_FILE

    index = index_folder(config, root, run_dir)
    # every method's run reads RUN's index (rag and the +rag variants answer from it)
    shared = [f"retrieval.index={index.resolve()}"] if (index / INDEX_FILE).is_file() else []
    configs = {name: method_config(config, name, [*shared, *method_overrides.get(name, [])]) for name in names}
    if not (run_dir / "data" / "eval.jsonl").is_file():
        raise TailorError(f"{run_dir / 'data' / 'eval.jsonl'}: not found; run `tailor data build` first")
    questions = eval_questions(run_dir / "data" / "eval.jsonl", latency_questions)
    rows, base, failed, n_questions = [], None, {}, None
    for position, name in enumerate(names):
        settings = configs[name]
        method_dir = run_dir / COMPARE_DIR / name
        derive_run_folder(run_dir, method_dir)  # RUN's corpus, data and index, linked
        console.print(f"[bold]{name}[/]: training in {method_dir}", highlight=False)
        try:
            result = run_training(settings, root, method_dir, show_progress=show_progress)
            # a built method (prompt, rag, ...) trains nothing
            trainable, steps = (0, 0) if isinstance(result, BuildResult) else (result.trainable_params, result.steps)
            # the base model is the same for every method: scored once, with the first method
            report = run_eval(settings, root, method_dir, show_progress=show_progress, write_html=False,
                              only_customized=base is not None)
            scores, n_questions = report["models"][method_name(name)], report["n_questions"]
            if base is None:
                base_scores = report["models"]["base"]
                base = CompareRow("base", base_scores["token_f1"], base_scores["exact_match"],
                                  base_scores["eval_loss"], 0.0, 0, 0,
                                  answer_latency_ms(settings, root, method_dir, questions, "base"),
                                  fact_recall=base_scores.get("fact_recall"))
            rows.append(CompareRow(
                method=name, token_f1=scores["token_f1"], exact_match=scores["exact_match"],
                eval_loss=scores["eval_loss"], train_seconds=round(result.seconds, 1),
                trainable_params=trainable,
                artifact_bytes=folder_bytes(artifact_dir(method_dir, registry.get(method_name(name)))),
                latency_ms=answer_latency_ms(settings, root, method_dir, questions, method_name(name)),
                steps=steps, run_dir=str(method_dir),
                **{key: scores.get(key) for key in ("fact_recall", "recall_at_5", "citation_accuracy")}))
        except Exception as exc:  # noqa: BLE001 - with keep_going any failure is reported, not only ours
            if not keep_going:
                raise
            failed[name] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TailorError) else str(exc)
            console.print(f"[bold red]{name} failed[/]: {failed[name]}", highlight=False)
        # cheapest first: what trains least, then what trains fastest
        rows.sort(key=lambda row: (row.trainable_params, row.train_seconds))
        summary = {"created_at": now_iso(), "eval_file": str(run_dir / "data" / "eval.jsonl"),
                   "n_questions": n_questions, "latency_questions": len(questions),
                   "base": asdict(base) if base else None, "methods": [asdict(row) for row in rows],
                   "pending": names[position + 1:], **({"failed": failed} if failed else {})}
        # after every method: an interrupted comparison keeps the methods it finished
        write_json(run_dir / COMPARE_DIR / "compare.json", summary)
    return summary


def compare_table(summary: dict) -> Table:
    table = Table(title=f"Methods compared on {summary['n_questions']} held-out questions (cheapest first)")
    for column in ("method", "token F1", "exact match", "fact recall", "eval loss", "recall@5", "cited right",
                   "train s", "trainable params", "artifact", "ms / answer"):
        table.add_column(column, justify="left" if column == "method" else "right")

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    for row in [*([summary["base"]] if summary["base"] else []), *summary["methods"]]:
        size = row["artifact_bytes"]
        table.add_row(row["method"], f"{row['token_f1']:.4f}", f"{row['exact_match']:.4f}",
                      fmt(row.get("fact_recall")), fmt(row["eval_loss"]), fmt(row.get("recall_at_5")),
                      fmt(row.get("citation_accuracy")), f"{row['train_seconds']:.1f}",
                      f"{row['trainable_params']:,}", "-" if row["method"] == "base" else _size(size),
                      f"{row['latency_ms']:.0f}")
    if summary.get("failed"):
        table.caption = "failed: " + "; ".join(f"{name}: {reason}" for name, reason in summary["failed"].items())
    return table


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def compare(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
            methods: str = typer.Option(..., "--methods", "-m", help=(
                "Comma-separated methods, e.g. prompt,rag,p_tuning,lora,lora+rag,full (METHOD+rag: trained and "
                "evaluated with retrieval).")),
            latency_questions: int = typer.Option(5, "--latency-questions", min=1, help=(
                "Held-out questions answered one at a time to measure latency.")),
            keep_going: bool = typer.Option(False, "--keep-going", help=(
                "A method that fails is reported in the table's caption and compare.json; the others still run.")),
            no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars.")) -> None:
    """Train (or build) several methods on the same run data, evaluate each on the same questions, and print one
    table, cheapest first → RUN/compare/compare.json. METHOD:KEY=VALUE overrides apply to one method only."""
    common, per_method = split_overrides(list(overrides or []))
    config, root = open_workspace(workspace, common)
    run_dir = run_folder(root, run)
    names = [name.strip() for name in methods.split(",") if name.strip()]
    summary = run_compare(config, root, run_dir, names, show_progress=not no_progress,
                          latency_questions=latency_questions, method_overrides=per_method, keep_going=keep_going)
    console.print(compare_table(summary))
    console.print(f"results: {run_dir / COMPARE_DIR / 'compare.json'}", soft_wrap=True, highlight=False)
    if summary.get("failed"):
        raise typer.Exit(1)  # a comparison with a broken method must not pass as complete in a script
